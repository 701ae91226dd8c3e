"""InternVL (`InternVLForConditionalGeneration`): ViT tiles, pixel shuffle, MLP projector.

Each tile gives `g x g` tokens (`g = image_size / patch_size * downsample_ratio`, each token the
channel-stack of a 2 x 2 patch block); an image is 1 tile or several crop tiles plus a thumbnail,
and all its tiles share one `<img> ... </img>` placeholder run, so n_i = tiles * g^2 and the
features of one image are its tiles' tokens concatenated.

Context. Positions: the tile grid of each token (from running the model's own `pixel_shuffle` on
patch indices, so the 2 x 2 grouping is the library's). With one tile the tokens are an exact
g x g grid. With several tiles the processor does not report the image size, so the crop layout
is taken from `model_inputs["image_sizes"]` ([(h, w)] per image, optional) through the image
processor's tiling rule, else assumed the most square rows x cols = tiles - 1 (wider than
tall); the thumbnail's tokens cover the whole image. [CLS] attention and keys: the ViT layer
producing the feature layer, recomputed from its input hidden state with its own
`layernorm_before`, `q_proj`/`k_proj` (and `q_norm`/`k_norm`); each token averages its four
patches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mc_core.models.adapters.attention import attention_probs, feature_layer_index, head_split
from mc_core.models.adapters.base import Adapter
from mc_core.models.adapters.placeholders import ImageSlot
from mc_core.models.adapters.positions import grid_positions

__all__ = ["InternVLAdapter"]


def placeholder_runs(model_inputs, token_id: int) -> list[int]:
    """Lengths of the contiguous runs of `token_id` in `input_ids`, row by row."""
    ids = model_inputs["input_ids"]
    mask = model_inputs.get("attention_mask")
    runs = []
    for b in range(ids.shape[0]):
        row = ids[b] if mask is None else ids[b][mask[b].bool()]
        hit = (row == token_id).int()
        edges = torch.diff(torch.cat([hit.new_zeros(1), hit, hit.new_zeros(1)]))
        starts = (edges == 1).nonzero().squeeze(1)
        ends = (edges == -1).nonzero().squeeze(1)
        runs.extend((ends - starts).tolist())
    return runs


class InternVLAdapter(Adapter):
    """Adapter for `InternVLForConditionalGeneration`."""

    family = "internvl"

    def _side(self) -> tuple[int, int]:
        """(patches per tile side, tokens per tile side)."""
        vc = self.config.vision_config
        size, patch = vc.image_size, vc.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        side = size // patch
        return side, int(side * self.config.downsample_ratio)

    def placeholder_counts(self, model_inputs) -> list[int]:
        return placeholder_runs(model_inputs, self.image_token_id)

    def _tiles(self, model_inputs) -> list[int]:
        per_tile = self._side()[1] ** 2
        counts = self.placeholder_counts(model_inputs)
        tiles = []
        for i, n in enumerate(counts):
            if n % per_tile:
                raise ValueError(
                    f"image {i} has {n} placeholders, not a multiple of {per_tile} per tile"
                )
            tiles.append(n // per_tile)
        total = model_inputs["pixel_values"].shape[0]
        if sum(tiles) != total:
            raise ValueError(
                f"placeholders account for {sum(tiles)} tiles, pixel_values has {total}"
            )
        return tiles

    def _features(self, model_inputs, *, hidden: bool = False) -> BaseModelOutputWithPooling:
        if model_inputs.get("pixel_values") is None:
            raise ValueError("model_inputs has no 'pixel_values' (no image in this batch?)")
        kwargs = {"output_hidden_states": True} if hidden else {}
        return self.model.model.get_image_features(
            pixel_values=model_inputs["pixel_values"], return_dict=True, **kwargs
        )

    def visual_tokens(self, model_inputs) -> list[Tensor]:
        feats = self._features(model_inputs).pooler_output  # (T, g*g, d)
        return [x.flatten(0, 1) for x in torch.split(feats, self._tiles(model_inputs))]

    def _patch_groups(self, device) -> Tensor:
        """[g*g, 4]: the tile's patch indices (row-major) stacked into each output token."""
        side, _ = self._side()
        idx = torch.arange(side * side, dtype=torch.float64, device=device).reshape(
            1, side, side, 1
        )
        shuffled = self.model.model.pixel_shuffle(idx, scale_factor=self.config.downsample_ratio)
        return shuffled.reshape(-1, shuffled.shape[-1]).round().long()

    def _layout(self, tiles: int, size: tuple[int, int] | None) -> tuple[int, int]:
        crops = tiles - 1
        if size is not None:
            from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
                get_optimal_tiled_canvas,
            )

            tile = self.config.vision_config.image_size
            tile = tile[0] if isinstance(tile, (list, tuple)) else tile
            # The processor's own rule, restricted to canvases of exactly `crops` tiles.
            cols, rows = get_optimal_tiled_canvas(
                (int(size[0]), int(size[1])), (tile, tile), crops, crops
            )
            if rows * cols == crops:
                return rows, cols
        rows = max(r for r in range(1, math.isqrt(crops) + 1) if crops % r == 0)
        return rows, crops // rows

    def _positions(self, tiles: int, size, groups: Tensor) -> Tensor:
        side, g = self._side()
        patch = (
            torch.stack(
                [(groups // side).double() + 0.5, (groups % side).double() + 0.5], dim=-1
            ).mean(1)
            / side
        )  # (g*g, 2) token centres on one tile
        if tiles == 1:
            return patch.float()
        rows, cols = self._layout(tiles, size)
        pos = []
        for t in range(tiles - 1):
            r, c = divmod(t, cols)
            pos.append(torch.stack([(patch[:, 0] + r) / rows, (patch[:, 1] + c) / cols], dim=-1))
        pos.append(patch)  # thumbnail: the whole image
        return torch.cat(pos).float()

    def contexts(self, model_inputs, need=frozenset()):
        from mc_core.compressors import TokenContext

        need = self._check_need(need)
        tiles = self._tiles(model_inputs)
        device = model_inputs["pixel_values"].device
        groups = self._patch_groups(device)  # (g*g, 4)
        _, g = self._side()
        sizes = model_inputs.get("image_sizes")
        # An exact g x g row-major grid iff the shuffle keeps tokens in row-major block order.
        exact = bool(
            torch.equal(self._positions(1, None, groups), grid_positions(g, g, device=device))
        )
        cls = keys = None
        if need & {"cls_attention", "keys"}:
            cls, keys = self._cls_and_keys(model_inputs, groups)  # (T, g*g), (T, g*g, dv)
        result, t0 = [], 0
        for i, t in enumerate(tiles):
            size = None if sizes is None else tuple(sizes[i].tolist())
            ctx = TokenContext(
                positions=self._positions(t, size, groups),
                grid=(g, g) if t == 1 and exact else None,
            )
            if cls is not None and "cls_attention" in need:
                ctx.cls_attention = cls[t0 : t0 + t].flatten()
            if keys is not None and "keys" in need:
                ctx.keys = keys[t0 : t0 + t].flatten(0, 1)
            t0 += t
            result.append(ctx)
        return result

    def _cls_and_keys(self, model_inputs, groups: Tensor) -> tuple[Tensor, Tensor]:
        tower = self.model.model.vision_tower
        layers = tower.encoder.layer
        out = self._features(model_inputs, hidden=True)
        feature_layer = self.config.vision_feature_layer
        if isinstance(feature_layer, (list, tuple)):
            feature_layer = feature_layer[-1]
        j = feature_layer_index(
            int(feature_layer), len(layers), where="config.vision_feature_layer"
        )
        layer = layers[j]
        attn = layer.attention
        x = layer.layernorm_before(out.hidden_states[j])  # (T, 1+S, dv)
        q = head_split(attn.q_norm(attn.q_proj(x)), attn.num_heads)[:, :, :1]  # (T, H, 1, dh)
        k_flat = attn.k_norm(attn.k_proj(x))  # (T, 1+S, dv)
        k = head_split(k_flat, attn.num_heads)
        cls = attention_probs(q, k, attn.scale).mean(dim=1)[:, 0, 1:]  # (T, S)
        cls = cls[:, groups].mean(-1)  # (T, g*g)
        keys = k_flat[:, 1:][:, groups].mean(-2)  # (T, g*g, dv)
        return cls, keys

    def _mm_encoder_inputs(
        self, model_inputs, tokens: list[Tensor], slots: list[ImageSlot], rewritten: dict
    ) -> dict[str, Any]:
        # InternVL scatters a tensor (tiles, tokens, d); one row holding every image's tokens.
        flat = torch.cat(list(tokens))[None]  # (1, sum m_i, d)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=flat)}}
