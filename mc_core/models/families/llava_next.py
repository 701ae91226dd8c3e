"""LLaVA-NeXT / 1.6 (`LlavaNextForConditionalGeneration`): anyres crops packed into one sequence.

Per image: the base view's `s x s` grid (the whole image resized), then the crops stitched into
one grid, unpadded to the image's aspect, with one `image_newline` token closing each row. Same
tokens and chat format as LLaVA-1.5; position default "packed" (the HF convention).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from mc_core.models.adapters.llava_next import LlavaNextAdapter
from mc_core.models.families import register
from mc_core.models.families.base import BenchShape, RealSpec, TinySpec
from mc_core.models.families.llava import (
    CLIP_L_336,
    CPU_CLIP,
    CPU_TEXT,
    TINY_CLIP,
    VICUNA_7B,
    Llava,
)

__all__ = ["LlavaNext"]


@register
class LlavaNext(Llava):
    """LLaVA-NeXT (anyres)."""

    name = "llava_next"
    model_types = ("llava_next",)
    model_class = LlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    adapter_class = LlavaNextAdapter
    positions = "packed"
    image_keys = Llava.image_keys | {"grid_pinpoints"}
    tiny = {
        "tiny-llava-next": TinySpec(
            name="tiny-llava-next",
            family="llava_next",
            image_cfg={
                "image_size": 224,
                "patch_size": 14,
                # [height, width] multiples of the crop side. A 224 px square is one crop plus
                # the base view (both whole-image views, so the tower's position table locates
                # every token); a 224 x 448 image gets two crops. Smaller crops would hide from
                # the tower which crop a token came from.
                "grid_pinpoints": [[224, 224], [224, 448], [448, 224], [448, 448]],
            },
            vision_image_size=224,
            patch_size=14,
            text_layers=4,  # as tiny-llava (FastV's layer 2 is not the teacher's pointer layer)
        ),
    }
    # tests/conftest.py: 32 px base tile / patch 8 (16 tokens) + anyres crops + newlines.
    test = TinySpec(
        name="test-llava-next",
        family="llava_next",
        image_cfg={
            "image_size": 32,
            "patch_size": 8,
            "grid_pinpoints": [[64, 32], [32, 64], [64, 64]],
        },
        vision_image_size=32,
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
        "llava-next-7b": RealSpec(
            name="llava-next-7b",
            hf_id="llava-hf/llava-v1.6-vicuna-7b-hf",
            family="llava_next",
            model_class="LlavaNextForConditionalGeneration",
            processor_kwargs={
                "image_size": 336,
                "patch_size": 14,
                "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            },
            notes="anyres up to 2x2 crops of 336 px plus the base view (<= 2880 tokens)",
        ),
    }
    bench = {
        "llava-next-7b": BenchShape(
            name="llava-next-7b",
            reference="llava-hf/llava-v1.6-vicuna-7b-hf",
            text=VICUNA_7B,
            vision=CLIP_L_336,
            cpu_text=CPU_TEXT,
            cpu_vision=CPU_CLIP,
            tiny_vision=TINY_CLIP,
            # anyres: 672x672 picks the 2x2 grid: base 576 + 48x48 crop tokens + 48 newlines.
            image_size=(672, 672),
            extra=dict(
                image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            ),
        ),
    }

    def build_processor(self, tokenizer, image_cfg: dict[str, Any]):
        """As LLaVA-1.5 plus grid_pinpoints [[[2s, s], [s, 2s], [2s, 2s]] for s = image_size]
        (list of [height, width], multiples of image_size)."""
        common, kwargs = self._processor_kwargs(image_cfg)
        size = common["crop_size"]["height"]
        pinpoints = image_cfg.get(
            "grid_pinpoints", [[2 * size, size], [size, 2 * size], [2 * size, 2 * size]]
        )
        for hw in pinpoints:
            if len(hw) != 2 or any(int(v) <= 0 or int(v) % size for v in hw):
                raise ValueError(
                    f"image_cfg['grid_pinpoints'] entry {hw!r}: expected [height, width], "
                    f"positive multiples of image_size={size}"
                )
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints], **common
        )
        return LlavaNextProcessor(image_processor, tokenizer, **kwargs)

    def tiny_config(self, spec: TinySpec, tokenizer):
        return LlavaNextConfig(
            image_grid_pinpoints=spec.image_cfg["grid_pinpoints"], **self._common(spec, tokenizer)
        )

    def bench_config(self, shape: BenchShape, text: dict, vision: dict):
        return LlavaNextConfig(**self._bench_common(text, vision), **shape.extra)

    def bench_inputs(self, model, shape: BenchShape, gen) -> tuple[Any, dict, list[int]]:
        cfg = model.config
        size = cfg.vision_config.image_size
        h, w = shape.image_size
        # rows x cols crops + the resized base image (the processor's layout for this size).
        pixel_values = torch.randn(1, 1 + (h // size) * (w // size), 3, size, size, generator=gen)
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
        sizes = torch.tensor([[h, w]], device=model.device)
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
        n = int(getattr(feats, "pooler_output", feats)[0].shape[0])
        return pixel_values, {"image_sizes": sizes}, [cfg.image_token_id] * n

    def token_grids(
        self, config, image_side: int, processor=None
    ) -> tuple[tuple[int, int, bool], ...]:
        (base,) = super().token_grids(config, image_side, processor)
        vc = config.vision_config
        crop, per = vc.image_size, vc.image_size // vc.patch_size
        # The library's own anyres rules: best canvas, then unpadding to the image's aspect.
        best_h, best_w = select_best_resolution(
            (image_side, image_side), [list(p) for p in config.image_grid_pinpoints]
        )
        rows, cols = best_h // crop * per, best_w // crop * per
        shape = unpad_image(torch.zeros(1, rows, cols), (image_side, image_side)).shape
        return (base, (int(shape[1]), int(shape[2]), True))
