"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles packed into one sequence.

Per image the projector output arrives packed (transformers' `pack_image_features`): the base
tile's `s x s` grid (the whole image resized), then the crop tiles stitched into one grid,
unpadded to the image's aspect, with one `image_newline` token closing each row. So the length
depends on the image size and the tokens are not one grid (`grid` is None).

Context: base tokens sit at their cell centres; crop tokens at their cell centres on the
unpadded crop grid (which spans the whole image); newline tokens at the end of their row
(col = 1). [CLS] attention and keys come from each tile's CLIP pass (as for LLaVA-1.5) and are
mapped to the packed order by running `pack_image_features` itself on tile/patch indices, so the
mapping is the library's own; newline tokens get attention 0 and a zero key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from mc_core.models.adapters.base import Adapter
from mc_core.models.adapters.llava import clip_attention_and_keys
from mc_core.models.adapters.placeholders import ImageSlot
from mc_core.models.adapters.positions import grid_positions

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(Adapter):
    """Adapter for `LlavaNextForConditionalGeneration` (LLaVA-1.6)."""

    family = "llava_next"

    def _sizes(self, model_inputs) -> Tensor:
        sizes = model_inputs.get("image_sizes")
        if sizes is None or model_inputs.get("pixel_values") is None:
            raise ValueError(
                "model_inputs needs 'pixel_values' and 'image_sizes' (LLaVA-NeXT processor)"
            )
        return sizes

    def _patches_per_tile(self) -> int:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side * side + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def _tiles(self, model_inputs) -> list[int]:
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in self._sizes(model_inputs)
        ]

    def index_maps(self, model_inputs) -> list[Tensor]:
        """Per image, the packed position -> `tile * P + patch` (P patches per tile), -1 = newline.

        Computed by packing index "features" with the model's own `pack_image_features`.
        """
        sizes = self._sizes(model_inputs)
        p = self._patches_per_tile()
        feats = [
            torch.arange(t * p, dtype=torch.float64, device=sizes.device).reshape(t, p, 1)
            for t in self._tiles(model_inputs)
        ]
        packed, _ = self.model.model.pack_image_features(
            feats,
            sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0], dtype=torch.float64, device=sizes.device),
        )
        return [x[:, 0].round().long() for x in packed]

    def placeholder_counts(self, model_inputs) -> list[int]:
        return [len(m) for m in self.index_maps(model_inputs)]

    def _features(self, model_inputs, *, hidden: bool = False) -> BaseModelOutputWithPooling:
        return self.model.model.get_image_features(
            pixel_values=model_inputs["pixel_values"],
            image_sizes=self._sizes(model_inputs),
            output_hidden_states=hidden or None,
            return_dict=True,
        )

    def visual_tokens(self, model_inputs) -> list[Tensor]:
        return list(self._features(model_inputs).pooler_output)

    def _positions(self, index: Tensor) -> Tensor:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        p = self._patches_per_tile()
        base = grid_positions(side, side, device=index.device)
        if p != side * side:  # "full": the CLS token first, at the image centre
            base = torch.cat([base.new_tensor([[0.5, 0.5]]), base])
        crop = index[p:]
        newline = crop < 0
        rows = int(newline.sum())
        if len(crop) == 0:
            return base
        if rows == 0 or len(crop) % rows:
            raise ValueError(
                f"packed LLaVA-NeXT crop part of {len(crop)} tokens is not rows of w + 1"
            )
        width = len(crop) // rows - 1
        k = torch.arange(len(crop), device=index.device)
        r, c = k // (width + 1), k % (width + 1)
        pos = torch.stack([(r + 0.5) / rows, (c + 0.5) / max(width, 1)], dim=1).float()
        pos[newline, 1] = 1.0
        return torch.cat([base, pos])

    def contexts(self, model_inputs, need=frozenset()):
        from mc_core.compressors import TokenContext

        need = self._check_need(need)
        maps = self.index_maps(model_inputs)
        cls = keys = None
        if need & {"cls_attention", "keys"}:
            out = self._features(model_inputs, hidden=True)
            cls, keys = clip_attention_and_keys(
                self.model.model.vision_tower, out.hidden_states, self.config.vision_feature_layer
            )  # (T, 1+P), (T, 1+P, dv) over all tiles of all images
            if self.config.vision_feature_select_strategy == "default":
                cls, keys = cls[:, 1:], keys[:, 1:]
            cls, keys = cls.flatten(0, 1), keys.flatten(0, 1)  # (T*P,), (T*P, dv)
        result = []
        offset = 0
        for index, tiles in zip(maps, self._tiles(model_inputs), strict=True):
            ctx = TokenContext(positions=self._positions(index))
            if cls is not None:
                flat = (index + offset).clamp(min=0)
                line = index < 0
                if "cls_attention" in need:
                    ctx.cls_attention = cls[flat].masked_fill(line, 0.0)
                if "keys" in need:
                    ctx.keys = keys[flat].masked_fill(line[:, None], 0.0)
            offset += tiles * self._patches_per_tile()
            result.append(ctx)
        return result

    def _mm_encoder_inputs(
        self, model_inputs, tokens: list[Tensor], slots: list[ImageSlot], rewritten: dict
    ) -> dict[str, Any]:
        return {
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(tokens))}
        }
