"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): native resolution, 2 x 2 merge, M-RoPE.

An image of H x W pixels gives `(H / 2p) x (W / 2p)` merged tokens (p = 14), a row-major grid;
the LLM locates them through 3-D (t, row, col) rotary positions. Chat format: ChatML with
`<|vision_start|><|image_pad|><|vision_end|>` per image.

Position default "source": each compressed token takes the P-weighted mean of its sources'
M-RoPE positions. The tower is rotary-only, so a token carries no absolute location in its
features: the LLM reads location from the positions alone, and packing them onto a smaller
grid moves every token.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from mc_core.models.adapters.qwen2_vl import Qwen2VLAdapter
from mc_core.models.families import register
from mc_core.models.families.base import BenchShape, Family, RealSpec, TinySpec
from mc_core.models.processing import NoVideoMixin, chatml_template, norm_cfg, positive_int

__all__ = ["OfflineQwen2VLProcessor", "Qwen2VL", "mrope_sections"]

QWEN = {
    "bos": "<|im_start|>",  # Qwen has no BOS; generation_config uses eos/pad only.
    "eos": "<|im_end|>",
    "unk": "<unk>",
    "pad": "<|endoftext|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "im_start": "<|im_start|>",
    "end_of_turn": "<|im_end|>",
}
QWEN_IMAGE_KEYS = frozenset(
    {
        "min_pixels",
        "max_pixels",
        "patch_size",
        "merge_size",
        "temporal_patch_size",
        "image_mean",
        "image_std",
    }
)
# Real Qwen2-VL / Qwen2.5-VL processor settings.
QWEN_REAL_PIXELS = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}


class OfflineQwen2VLProcessor(NoVideoMixin, Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor."""

    _image_processor_cls = Qwen2VLImageProcessorPil


def mrope_sections(head_dim: int) -> list[int]:
    """(temporal, height, width) rotary sections summing to head_dim / 2, in Qwen2-VL's
    proportions ([16, 24, 24] of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen_image_processor(image_cfg: dict[str, Any]) -> Qwen2VLImageProcessorPil:
    """The image processor of a Qwen processor config, checked (defaults: the real models')."""
    patch = positive_int(image_cfg, "patch_size", 14)
    merge = positive_int(image_cfg, "merge_size", 2)
    temporal = positive_int(image_cfg, "temporal_patch_size", 2)
    min_pixels = positive_int(image_cfg, "min_pixels", 56 * 56)
    max_pixels = positive_int(image_cfg, "max_pixels", 28 * 28 * 1280)
    if min_pixels > max_pixels:
        raise ValueError(f"image_cfg min_pixels={min_pixels} > max_pixels={max_pixels}")
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=temporal,
        **norm_cfg(image_cfg),
    )


# The family's records (module constants, so the descriptor class holds only its behaviour):
# the world teacher, the test model, the real checkpoint and its benchmark shape.
TINY_SPECS = {
    "tiny-qwen2-vl": TinySpec(
        name="tiny-qwen2-vl",
        family="qwen2_vl",
        # The processor upsizes a 224 px image to min_pixels = 336^2 (Qwen's own resize:
        # sides rounded to patch * merge = 28), so patch 14 merged 2 x 2 gives 12 x 12 =
        # 144 tokens, each 18.7 px of the original: about one token per object, as in
        # tiny-llava. At 224 px (8 x 8 = 64 tokens of 28 px) rate 0.9 kept 7 tokens for
        # scenes of up to 16 objects, so even the ground-truth selector lost half the
        # accuracy: that measured the grid, not the compressors.
        image_cfg={
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "min_pixels": 336 * 336,
            "max_pixels": 448 * 448,
        },
        vision_image_size=336,
        patch_size=14,
        text_layers=4,  # as tiny-llava (FastV's layer 2 is not the teacher's pointer layer)
        # The rotary-only tower cannot know where a token is: the LLM reads it from mrope.
        # theta 10 gives the height / width sections (the lowest frequencies) a visible
        # rotation over a 12-token grid (theta 1e4 leaves the width section at < 0.03 rad).
        rope_theta=10.0,
    ),
}
# tests/conftest.py: one token per 28 x 28 pixels, at most 4 x 4 per image.
TEST_SPEC = TinySpec(
    name="test-qwen2-vl",
    family="qwen2_vl",
    image_cfg={"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16},
    vision_image_size=56,
    patch_size=14,
    text_hidden=64,
    text_intermediate=128,
    text_kv_heads=2,
    vision_hidden=32,
    vision_intermediate=64,
    vision_heads=2,
    max_positions=512,
)
REAL_SPECS = {
    "qwen2-vl-7b": RealSpec(
        name="qwen2-vl-7b",
        hf_id="Qwen/Qwen2-VL-7B-Instruct",
        family="qwen2_vl",
        model_class="Qwen2VLForConditionalGeneration",
        processor_kwargs=QWEN_REAL_PIXELS,
        notes="dynamic resolution, 2x2 merge, mrope",
    ),
}
BENCH_SHAPES = {
    "qwen2-vl-7b": BenchShape(
        name="qwen2-vl-7b",
        reference="Qwen/Qwen2-VL-7B-Instruct",
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        # head_dim 64 at cpu scale: mrope_section is derived from head_dim.
        cpu_text=dict(
            hidden_size=1024,
            intermediate_size=2752,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        cpu_vision=dict(depth=4, embed_dim=256, num_heads=4),
        tiny_vision=dict(depth=2, embed_dim=32, num_heads=2),
        # 672x672 -> 48x48 patches -> 24x24 = 576 tokens after the 2x2 merge.
        image_size=(672, 672),
    ),
}


@register
class Qwen2VL(Family):
    """Qwen2-VL."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    processor_class = OfflineQwen2VLProcessor
    adapter_class = Qwen2VLAdapter
    positions = "source"
    specials = QWEN
    template_words = ("user", "assistant", "system")
    image_keys = QWEN_IMAGE_KEYS
    token_types = True
    tiny = TINY_SPECS
    test = TEST_SPEC
    real = REAL_SPECS
    bench = BENCH_SHAPES

    def chat_template(self) -> str:
        sp = self.specials
        return chatml_template(sp["vision_start"] + sp["image"] + sp["vision_end"])

    def build_processor(self, tokenizer, image_cfg: dict[str, Any]):
        """min_pixels [56*56], max_pixels [28*28*1280], patch_size [14], merge_size [2],
        temporal_patch_size [2]."""
        return self.processor_class(
            qwen_image_processor(image_cfg), tokenizer, None, chat_template=self.chat_template()
        )

    # -- configs ------------------------------------------------------------------------------
    def _text(self, spec: TinySpec, tokenizer) -> dict:
        return dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
            model_type=f"{self.name}_text",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": spec.rope_theta,
                "mrope_section": mrope_sections(spec.text_hidden // spec.text_heads),
            },
        )

    def _vision(self, spec: TinySpec) -> dict:
        return dict(
            depth=spec.vision_layers,
            embed_dim=spec.vision_hidden,
            hidden_size=spec.text_hidden,
            num_heads=spec.vision_heads,
            mlp_ratio=spec.vision_intermediate // spec.vision_hidden,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.image_cfg.get("merge_size", 2),
            temporal_patch_size=spec.image_cfg.get("temporal_patch_size", 2),
        )

    def _ids(self, tokenizer) -> dict[str, int]:
        sp = self.specials
        return {
            f"{role}_token_id": tokenizer.convert_tokens_to_ids(sp[role])
            for role in ("image", "video", "vision_start", "vision_end")
        }

    def tiny_config(self, spec: TinySpec, tokenizer):
        return self.model_class.config_class(
            text_config=self._text(spec, tokenizer),
            vision_config=self._vision(spec),
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **self._ids(tokenizer),
        )

    def bench_config(self, shape: BenchShape, text: dict, vision: dict):
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        text_cfg = dict(
            text,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": mrope_sections(head_dim),
            },
        )
        vocab = text["vocab_size"]
        if vocab > 151656:
            ids = {}  # the real special ids fit
        else:  # tiny vocabulary: the last four ids play the vision specials
            # bos/eos inside the vocabulary too (the config warns otherwise).
            text_cfg.update(bos_token_id=vocab - 5, eos_token_id=vocab - 6)
            ids = dict(
                image_token_id=vocab - 1,
                video_token_id=vocab - 2,
                vision_start_token_id=vocab - 3,
                vision_end_token_id=vocab - 4,
            )
        vision_cfg = dict(vision, hidden_size=text["hidden_size"])
        return Qwen2VLConfig(text_config=text_cfg, vision_config=vision_cfg, **ids)

    def bench_inputs(self, model, shape: BenchShape, gen) -> tuple[Any, dict, list[int]]:
        cfg = model.config
        vc = cfg.vision_config
        h, w = shape.image_size
        gh, gw = h // vc.patch_size, w // vc.patch_size
        channels = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixel_values = torch.randn(gh * gw, channels, generator=gen)
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
        extra = {"image_grid_thw": torch.tensor([[1, gh, gw]], device=model.device)}
        n = gh * gw // vc.spatial_merge_size**2
        run = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id]
        return pixel_values, extra, run

    def token_grids(
        self, config, image_side: int, processor=None
    ) -> tuple[tuple[int, int, bool], ...]:
        vc = config.vision_config
        if processor is not None:
            # The processor's own resize (min / max pixels, multiples of patch * merge).
            blank = Image.new("RGB", (image_side, image_side))
            _, h, w = processor.image_processor(images=[blank])["image_grid_thw"][0].tolist()
            m = vc.spatial_merge_size
            return ((int(h) // m, int(w) // m, False),)
        step = vc.patch_size * vc.spatial_merge_size
        if image_side % step:
            raise ValueError(
                f"image_side={image_side} is not a multiple of patch * merge = {step}: the "
                "processor would resize it"
            )
        g = image_side // step
        return ((g, g, False),)
