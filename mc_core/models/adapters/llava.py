"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, an MLP projector, one fixed grid.

Each image gives `(S / p)^2` tokens (the CLS token is dropped under the "default" feature
strategy) in row-major order, so the context is an exact grid. [CLS] attention and keys are those
of the CLIP layer whose output is the feature layer (`config.vision_feature_layer`, -2 by
default), recomputed from that layer's input hidden state with its own `layer_norm1`, `q_proj`
and `k_proj` (equal to the eager attention weights; see tests/test_adapters.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mc_core.models.adapters.attention import attention_probs, feature_layer_index, head_split
from mc_core.models.adapters.base import Adapter
from mc_core.models.adapters.placeholders import ImageSlot
from mc_core.models.adapters.positions import grid_positions

__all__ = ["LlavaAdapter", "clip_attention_and_keys"]


def _encoder_layers(tower):
    """The transformer layers of a CLIP-like tower (CLIPVisionModel or its inner model)."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"vision tower {type(tower).__name__} has no encoder.layers (not CLIP-like)")


def clip_attention_and_keys(
    tower, hidden_states: tuple[Tensor, ...], feature_layer: int | list[int]
) -> tuple[Tensor, Tensor]:
    """[CLS] attention and keys of the layer that produced the feature layer.

    Args:
        tower: a CLIP-like vision tower (`encoder.layers[j]` with `layer_norm1` and `self_attn`
            holding `q_proj`, `k_proj`, `num_heads`, `scale`).
        hidden_states: the tower's hidden states (embeddings, then each layer's output).
        feature_layer: `config.vision_feature_layer`; for a list, the last entry is used.

    Returns:
        cls_attention [N, 1 + P] (head-averaged, CLS -> every token incl. itself) and keys
        [N, 1 + P, dv] (heads concatenated), for N tower inputs (images or tiles).
    """
    layers = _encoder_layers(tower)
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = feature_layer[-1]
    j = feature_layer_index(int(feature_layer), len(layers), where="config.vision_feature_layer")
    layer = layers[j]
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_states[j])  # (N, 1+P, dv)
    q = head_split(attn.q_proj(x[:, :1]), attn.num_heads)  # (N, H, 1, dh)
    k = head_split(attn.k_proj(x), attn.num_heads)  # (N, H, 1+P, dh)
    cls = attention_probs(q, k, attn.scale).mean(dim=1)[:, 0]  # (N, 1+P)
    keys = k.transpose(1, 2).flatten(2)  # (N, 1+P, dv)
    return cls, keys


class LlavaAdapter(Adapter):
    """Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5)."""

    family = "llava"

    def _strategy(self) -> str:
        return self.config.vision_feature_select_strategy

    def _features(self, model_inputs, *, hidden: bool = False) -> BaseModelOutputWithPooling:
        pixel_values = model_inputs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("model_inputs has no 'pixel_values' (no image in this batch?)")
        return self.model.model.get_image_features(
            pixel_values=pixel_values, output_hidden_states=hidden or None, return_dict=True
        )

    def visual_tokens(self, model_inputs) -> list[Tensor]:
        return list(self._features(model_inputs).pooler_output)

    def placeholder_counts(self, model_inputs) -> list[int]:
        pv = model_inputs["pixel_values"]  # (N, 3, S, S)
        p = self.config.vision_config.patch_size
        n = (pv.shape[-2] // p) * (pv.shape[-1] // p)
        if self._strategy() == "full":
            n += 1
        return [n] * pv.shape[0]

    def contexts(self, model_inputs, need=frozenset()):
        from mc_core.compressors import TokenContext

        need = self._check_need(need)
        pv = model_inputs["pixel_values"]
        p = self.config.vision_config.patch_size
        h, w = pv.shape[-2] // p, pv.shape[-1] // p
        pos = grid_positions(h, w, device=pv.device)
        full = self._strategy() == "full"
        if full:  # the CLS token stands for the whole image: its centre
            pos = torch.cat([pos.new_tensor([[0.5, 0.5]]), pos])
        cls = keys = None
        if need & {"cls_attention", "keys"}:
            out = self._features(model_inputs, hidden=True)
            cls, keys = clip_attention_and_keys(
                self.model.model.vision_tower, out.hidden_states, self.config.vision_feature_layer
            )
            if not full:
                cls, keys = cls[:, 1:], keys[:, 1:]
        return [
            TokenContext(
                positions=pos,
                grid=None if full else (h, w),
                cls_attention=cls[i] if cls is not None and "cls_attention" in need else None,
                keys=keys[i] if keys is not None and "keys" in need else None,
            )
            for i in range(pv.shape[0])
        ]

    def _mm_encoder_inputs(
        self, model_inputs, tokens: list[Tensor], slots: list[ImageSlot], rewritten: dict
    ) -> dict[str, Any]:
        return {
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(tokens))}
        }
