"""Shared tiny-model fixtures: real transformers LVLM classes, random init from config, offline.

Sizes follow docs/contracts.md (text hidden 64, 2 layers; vision hidden 32, 2 layers) so a
forward takes milliseconds on a busy 2-core machine. Every builder seeds torch so two calls give
the same weights. Models are in eval mode with the vision towers' and LLM's default attention.

`TINY` maps a family name to a builder returning `(model, processor)`; the session fixture
`tiny` caches them (`tiny("llava")`). Tests that mutate a model should build their own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mc_core.processing import build_processor

_WORDS = (
    "what colour shape is at row col the of a an in how many there yes no "
    "red green blue yellow circle square triangle 0 1 2 3 4 5 6 7 8 9 ? , ."
)
VOCAB = _WORDS.split()

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _ids(processor, family_tokens: dict[str, str]) -> dict[str, int]:
    tok = processor.tokenizer
    return {k: tok.convert_tokens_to_ids(v) for k, v in family_tokens.items()}


def _finish(model, processor):
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval(), processor


def _clip(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )


def build_llava():
    """LLaVA-1.5 style: CLIP 64x64 / patch 8 -> 64 visual tokens per image."""
    processor = build_processor("llava", VOCAB, image_size=64, patch_size=8)
    torch.manual_seed(0)
    ids = _ids(processor, {"image": "<image>", "pad": "<pad>"})
    cfg = LlavaConfig(
        vision_config=_clip(64),
        text_config=LlamaConfig(
            vocab_size=len(processor.tokenizer), pad_token_id=ids["pad"], **TEXT
        ),
        image_token_id=ids["image"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _finish(LlavaForConditionalGeneration(cfg), processor)


def build_llava_next():
    """LLaVA-NeXT style: 32x32 base tile / patch 8 (16 tokens) + anyres crops + newlines."""
    pinpoints = [[64, 32], [32, 64], [64, 64]]
    processor = build_processor(
        "llava_next", VOCAB, image_size=32, patch_size=8, grid_pinpoints=pinpoints
    )
    torch.manual_seed(0)
    ids = _ids(processor, {"image": "<image>", "pad": "<pad>"})
    cfg = LlavaNextConfig(
        vision_config=_clip(32),
        text_config=LlamaConfig(
            vocab_size=len(processor.tokenizer), pad_token_id=ids["pad"], **TEXT
        ),
        image_token_id=ids["image"],
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _finish(LlavaNextForConditionalGeneration(cfg), processor)


def _qwen_text(processor) -> dict:
    # M-RoPE needs sum(mrope_section) == head_dim // 2 (= 8 here).
    assert TEXT["hidden_size"] // TEXT["num_attention_heads"] // 2 == 8
    return dict(
        vocab_size=len(processor.tokenizer),
        pad_token_id=processor.tokenizer.pad_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **TEXT,
    )


def _qwen_ids(processor) -> dict:
    ids = _ids(
        processor,
        {
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
        },
    )
    return ids


# Qwen images: 28-pixel units; 16 merged tokens at most per image (4 x 4 of 2 x 2 patches).
QWEN_PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 16)


def build_qwen2_vl():
    """Qwen2-VL: patch 14, merge 2 -> one token per 28x28 pixels (<= 16 per image)."""
    processor = build_processor("qwen2_vl", VOCAB, **QWEN_PIXELS)
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=_qwen_text(processor),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_ids(processor),
    )
    return _finish(Qwen2VLForConditionalGeneration(cfg), processor)


def build_qwen2_5_vl():
    """Qwen2.5-VL: like Qwen2-VL plus windowed vision attention (block 1 is full attention)."""
    processor = build_processor("qwen2_5_vl", VOCAB, **QWEN_PIXELS)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(processor),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **_qwen_ids(processor),
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg), processor)


def build_internvl():
    """InternVL: 64x64 tiles / patch 8, pixel shuffle 0.5 -> 16 tokens per tile, up to 4 tiles."""
    processor = build_processor(
        "internvl", VOCAB, image_size=64, patch_size=8, downsample_ratio=0.5, max_patches=4
    )
    torch.manual_seed(0)
    tok = processor.tokenizer
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[64, 64],
            patch_size=[8, 8],
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
            **TEXT,
        ),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=16,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return _finish(InternVLForConditionalGeneration(cfg), processor)


TINY = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "internvl": build_internvl,
}


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image (different seeds give different images)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def user_turn(question: str, images: int = 0) -> dict:
    """A user message with `images` image items before the question."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


def assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


@pytest.fixture(scope="session")
def tiny():
    """Cached `(model, processor)` per family name; do not mutate the model."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = TINY[family]()
        return cache[family]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine two threads per process oversubscribe
    the cores (measured 90x slower for a tiny conversation); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
