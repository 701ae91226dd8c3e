"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, one fixed grid.

Each image is resized to the tower's side S and gives `(S / p)^2` tokens (the CLS token is
dropped under the "default" feature strategy), a row-major grid. Chat format: vicuna
("USER: <image> q ASSISTANT: a</s>"). Position default "packed": compressed tokens take m
consecutive positions, the HF convention and what a stock model does with fewer tokens.

In transformers 5.23 a 2-layer CLIP tower must use ``vision_feature_layer=-1`` (the default -2
would drop its last layer): the world's tiny spec says so.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from mc_core.models.adapters.llava import LlavaAdapter
from mc_core.models.families import register
from mc_core.models.families.base import BenchShape, Family, RealSpec, TinySpec
from mc_core.models.processing import norm_cfg, positive_int, vicuna_template

__all__ = ["Llava"]

VICUNA = {
    "bos": "<s>",
    "eos": "</s>",
    "unk": "<unk>",
    "pad": "<pad>",
    "image": "<image>",
    "end_of_turn": "</s>",
}
# LLaVA-1.5 / NeXT use Vicuna-7B (Llama-2 7B dims) with llava-hf's padded vocabulary.
VICUNA_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
# CLIP ViT-L/14 at 336 px: 24x24 = 576 patches (+ CLS).
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
# CPU scale: an LLM a 2-core machine prefills 600-3000 tokens with in seconds; head_dim stays 64+.
CPU_TEXT = dict(
    hidden_size=1024,
    intermediate_size=2752,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
)
CPU_CLIP = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def clip_geometry(image_cfg: dict[str, Any]) -> tuple[int, int, str]:
    """(image_size, patch_size, strategy) of a CLIP-tower processor config, checked."""
    size = positive_int(image_cfg, "image_size", 336)
    patch = positive_int(image_cfg, "patch_size", 14)
    if size % patch:
        raise ValueError(f"image_cfg['image_size']={size} is not a multiple of patch_size={patch}")
    strategy = image_cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(
            f"image_cfg['vision_feature_select_strategy']={strategy!r}: "
            "expected 'default' or 'full'"
        )
    return size, patch, strategy


@register
class Llava(Family):
    """LLaVA-1.5."""

    name = "llava"
    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    adapter_class = LlavaAdapter
    positions = "packed"
    specials = VICUNA
    template_words = ("USER", "ASSISTANT", "SYSTEM", ":")
    image_keys = frozenset(
        {"image_size", "patch_size", "vision_feature_select_strategy", "image_mean", "image_std"}
    )
    tiny = {
        "tiny-llava": TinySpec(
            name="tiny-llava",
            family="llava",
            image_cfg={"image_size": 224, "patch_size": 14},
            vision_image_size=224,
            patch_size=14,
            # 4 LLM layers: the teacher's pointer aid sits on the last, so FastV's layer 2 is
            # an ordinary layer (mc_core/training/teacher/aids.py).
            text_layers=4,
        ),
    }
    # tests/conftest.py: CLIP 64 px / patch 8 -> 64 visual tokens; feature layer -2 (layer 0).
    test = TinySpec(
        name="test-llava",
        family="llava",
        image_cfg={"image_size": 64, "patch_size": 8},
        vision_image_size=64,
        patch_size=8,
        text_hidden=64,
        text_intermediate=128,
        text_kv_heads=2,
        vision_hidden=32,
        vision_intermediate=64,
        vision_heads=2,
        vision_feature_layer=-2,
        max_positions=512,
    )
    real = {
        "llava-1.5-7b": RealSpec(
            name="llava-1.5-7b",
            hf_id="llava-hf/llava-1.5-7b-hf",
            family="llava",
            model_class="LlavaForConditionalGeneration",
            processor_kwargs={
                "image_size": 336,
                "patch_size": 14,
                "vision_feature_select_strategy": "default",
            },
            notes="CLIP ViT-L/14-336, 576 visual tokens, vision_feature_layer=-2",
        ),
    }
    bench = {
        "llava-1.5-7b": BenchShape(
            name="llava-1.5-7b",
            reference="llava-hf/llava-1.5-7b-hf",
            text=VICUNA_7B,
            vision=CLIP_L_336,
            cpu_text=CPU_TEXT,
            cpu_vision=CPU_CLIP,
            tiny_vision=TINY_CLIP,
            image_size=(336, 336),
        ),
    }

    def chat_template(self) -> str:
        return vicuna_template(self.specials["image"])

    def _processor_kwargs(self, image_cfg: dict[str, Any]) -> tuple[dict, dict]:
        size, patch, strategy = clip_geometry(image_cfg)
        common = dict(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            **norm_cfg(image_cfg),
        )
        kwargs = dict(
            patch_size=patch,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,  # CLIP-style towers add a CLS token
            chat_template=self.chat_template(),
            image_token=self.specials["image"],
        )
        return common, kwargs

    def build_processor(self, tokenizer, image_cfg: dict[str, Any]):
        """image_size [336], patch_size [14], vision_feature_select_strategy ["default": drop
        CLS, n = (image_size / patch_size)^2]."""
        common, kwargs = self._processor_kwargs(image_cfg)
        return LlavaProcessor(LlavaImageProcessorPil(**common), tokenizer, **kwargs)

    # -- configs ------------------------------------------------------------------------------
    @staticmethod
    def _text(spec: TinySpec, tokenizer) -> dict:
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
        )

    def _common(self, spec: TinySpec, tokenizer) -> dict:
        vision = CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.vision_image_size,
            patch_size=spec.patch_size,
            projection_dim=32,
        )
        return dict(
            vision_config=vision,
            text_config=LlamaConfig(**self._text(spec, tokenizer)),
            image_token_id=tokenizer.convert_tokens_to_ids(self.specials["image"]),
            vision_feature_layer=spec.vision_feature_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )

    def tiny_config(self, spec: TinySpec, tokenizer):
        side = spec.vision_image_size // spec.patch_size
        return LlavaConfig(image_seq_length=side**2, **self._common(spec, tokenizer))

    def _bench_common(self, text: dict, vision: dict) -> dict:
        text_cfg = LlamaConfig(**text)
        vision_cfg = CLIPVisionConfig(**vision)
        # llava-hf puts <image> right after the 32000-token Llama vocabulary; tiny vocabularies
        # use their last id.
        image_token = 32000 if text_cfg.vocab_size > 32000 else text_cfg.vocab_size - 1
        return dict(
            text_config=text_cfg,
            vision_config=vision_cfg,
            image_token_id=image_token,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
            tie_word_embeddings=False,
        )

    def bench_config(self, shape: BenchShape, text: dict, vision: dict):
        return LlavaConfig(**self._bench_common(text, vision), **shape.extra)

    def bench_inputs(self, model, shape: BenchShape, gen) -> tuple[Any, dict, list[int]]:
        cfg = model.config
        size = cfg.vision_config.image_size
        pixel_values = torch.randn(1, 3, size, size, generator=gen)
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
        return pixel_values, {}, [cfg.image_token_id] * cfg.image_seq_length

    def token_grids(
        self, config, image_side: int, processor=None
    ) -> tuple[tuple[int, int, bool], ...]:
        # The processor resizes every image to the tower's side: the side does not matter.
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: "
                "only 'default' (no CLS token) gives a grid"
            )
        vc = config.vision_config
        g = vc.image_size // vc.patch_size
        return ((g, g, False),)
