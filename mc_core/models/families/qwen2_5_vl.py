"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with a windowed-attention tower.

Everything the LLM side sees is Qwen2-VL's (tokens, chat format, 2 x 2 merge, M-RoPE, position
default "source"), so this descriptor derives from it. What differs: the model, config and
processor classes, the tower's config (RMSNorm + SwiGLU blocks, window attention except in
`fullatt_block_indexes`), and the tower's hidden states, which run on merge units permuted into
windows: the adapter undoes that permutation before recomputing the last block's attention.

This file is the whole family: adding it touched no other module.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)
from transformers.vision_utils import get_vision_window_index

from mc_core.models.adapters.qwen2_vl import Qwen2VLAdapter
from mc_core.models.families import register
from mc_core.models.families.base import RealSpec, TinySpec
from mc_core.models.families.qwen2_vl import QWEN_REAL_PIXELS, Qwen2VL
from mc_core.models.processing import NoVideoMixin

__all__ = ["OfflineQwen2_5_VLProcessor", "Qwen2_5_VL", "Qwen2_5_VLAdapter"]


class OfflineQwen2_5_VLProcessor(NoVideoMixin, Qwen2_5_VLProcessor):  # noqa: N801
    """`Qwen2_5_VLProcessor` without a video processor."""

    _image_processor_cls = Qwen2VLImageProcessorPil


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801
    """Qwen2-VL's adapter, reading the tower's hidden states in the processor's patch order."""

    family = "qwen2_5_vl"

    def _patch_order(self, hidden: Tensor, thw: Tensor) -> Tensor:
        visual = self.model.model.visual
        window_index, _ = get_vision_window_index(
            thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        unit = self.merge**2
        order = torch.argsort(window_index)
        return hidden.reshape(-1, unit, hidden.shape[-1])[order].flatten(0, 1)


@register
class Qwen2_5_VL(Qwen2VL):  # noqa: N801
    """Qwen2.5-VL."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = OfflineQwen2_5_VLProcessor
    adapter_class = Qwen2_5_VLAdapter
    positions = "source"
    tiny = {}  # no world teacher: the embedded grid uses Qwen2-VL
    # tests/conftest.py: as Qwen2-VL's test model; 56 px windows, block 1 full attention.
    test = TinySpec(
        name="test-qwen2.5-vl",
        family="qwen2_5_vl",
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
    real = {
        "qwen2.5-vl-7b": RealSpec(
            name="qwen2.5-vl-7b",
            hf_id="Qwen/Qwen2.5-VL-7B-Instruct",
            family="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_kwargs=QWEN_REAL_PIXELS,
            notes="window attention tower, 2x2 merge, mrope",
            # published config: Qwen/Qwen2.5-VL-7B-Instruct
            config=dict(
                text_config=dict(
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_attention_heads=28,
                    num_hidden_layers=28,
                    num_key_value_heads=4,
                    vocab_size=152064,
                    tie_word_embeddings=False,
                ),
                vision_config=dict(
                    depth=32,
                    hidden_size=1280,
                    intermediate_size=3420,
                    num_heads=16,
                    out_hidden_size=3584,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                ),
                image_token_id=151655,
                tie_word_embeddings=False,
            ),
        ),
    }
    bench = {}

    def _vision(self, spec: TinySpec) -> dict:
        merge = spec.image_cfg.get("merge_size", 2)
        return dict(
            depth=spec.vision_layers,
            hidden_size=spec.vision_hidden,
            out_hidden_size=spec.text_hidden,
            intermediate_size=spec.vision_intermediate,
            num_heads=spec.vision_heads,
            patch_size=spec.patch_size,
            spatial_merge_size=merge,
            temporal_patch_size=spec.image_cfg.get("temporal_patch_size", 2),
            # Windows of 2 x 2 merged tokens; the last block attends over the whole image, as
            # in the released models (whose cls_attention stand-in reads that block).
            window_size=2 * spec.patch_size * merge,
            fullatt_block_indexes=[spec.vision_layers - 1],
        )

    def tiny_config(self, spec: TinySpec, tokenizer):
        return Qwen2_5_VLConfig(
            text_config=self._text(spec, tokenizer),
            vision_config=self._vision(spec),
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **self._ids(tokenizer),
        )
