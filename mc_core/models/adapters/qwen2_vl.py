"""Qwen2-VL: native-resolution tower, 2 x 2 patch merger, M-RoPE positions.

Image i gives `H_i * W_i` tokens, a row-major grid of merged 2 x 2 patch blocks
(`image_grid_thw[i] = (1, 2 H_i, 2 W_i)` with merge size 2).

Positions of compressed tokens (M-RoPE), `positions=` of the adapter (default "source", the
family descriptor's). "packed": the LLM gives an image's tokens 3-D (t, row, col) positions
from `image_grid_thw`; for m_i tokens, `inputs_with` picks the factorisation m_i = h' * w'
whose aspect is closest to the original H_i / W_i and, when that aspect is within a factor of 2
of the original (`max_aspect_error`), passes a fake `image_grid_thw = (1, 2h', 2w')`: the m_i
tokens are laid out as a row-major h' x w' grid (exact at m_i = n_i). Otherwise (m_i prime, say)
the tokens are marked as text (`mm_token_type_ids = 0`) and get plain 1-D positions; the image
is left out of `image_grid_thw`. Either way the features are scattered into the placeholders
(that is keyed by `input_ids`, not the token types).

"source" with `inputs_with(..., P=P)`: explicit float `position_ids` (3, B, L) give token j of
image i the P-weighted mean of its sources' original (t, h, w) positions (RoPE takes
fractional positions; a one-hot row is the kept token's own position, P = I the untouched
model). Text keeps its original positions, so text after an image continues from the
uncompressed image's max position + 1, as stock. A forward pre-hook (installed once per model)
sets `rope_deltas` from such explicit positions on a fresh prefill, so cached text-only turns
and `generate` continue after them.

Context. Qwen's tower has no [CLS], so `cls_attention` is the mean attention each token
receives at the tower's last block (queries: every patch of the same image; heads averaged;
the four patches of a merged token averaged). It is recomputed from the block's input hidden
state with the block's own `norm1`, `qkv` and rotary embedding, over the whole image — exact for
full-attention blocks (every Qwen2-VL block; the last block of released Qwen2.5-VL models).
`keys` are that block's keys before the rotary embedding (position-free similarity), the four
patches of a merged token averaged.

The model caches `rope_deltas` between calls: `reset_state()` clears it before an unrelated
forward (a new dialogue); a cached continuation must keep it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids

from mc_core.models.adapters.attention import attention_probs
from mc_core.models.adapters.base import Adapter
from mc_core.models.adapters.placeholders import ImageSlot
from mc_core.models.adapters.positions import grid_positions

__all__ = ["Qwen2VLAdapter", "factor_grid"]


def _rope_deltas_from_positions(module, args, kwargs):
    """Forward pre-hook on the Qwen LLM wrapper: with explicit float M-RoPE positions (the ones
    `inputs_with(..., P=...)` builds) on a fresh prefill, set `rope_deltas` as `get_rope_index`
    would (next position minus the valid length), so cached continuations and `generate` steps
    that rely on it continue after the given positions. Other calls are left alone."""
    pos = kwargs.get("position_ids")
    if not isinstance(pos, Tensor) or not pos.is_floating_point() or pos.dim() != 3:
        return None
    if pos.shape[0] != 3:
        return None
    cache = kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        n_valid = mask.sum(-1).to(pos.dtype)  # (B,)
        top = pos.masked_fill(~mask.bool()[None], float("-inf")).amax(dim=(0, 2))  # (B,)
    else:
        n_valid = torch.full((pos.shape[1],), pos.shape[2], dtype=pos.dtype, device=pos.device)
        top = pos.amax(dim=(0, 2))
    module.rope_deltas = (top + 1 - n_valid).unsqueeze(1)  # (B, 1)
    return None


def factor_grid(m: int, height: int, width: int) -> tuple[int, int, float]:
    """The h' x w' = m grid closest in aspect to height x width.

    Returns:
        (h', w', error) with error = |log((h'/w') / (height/width))| (0 = same aspect).
    """
    target = math.log(height / width)
    best = None
    for h in range(1, math.isqrt(m) + 1):
        if m % h:
            continue
        for hh, ww in ((h, m // h), (m // h, h)):
            err = abs(math.log(hh / ww) - target)
            if best is None or err < best[2]:
                best = (hh, ww, err)
    return best


class Qwen2VLAdapter(Adapter):
    """Adapter for `Qwen2VLForConditionalGeneration` (and, subclassed, its derivatives)."""

    family = "qwen2_vl"
    # Largest |log aspect ratio| change for which compressed tokens keep 3-D positions.
    max_aspect_error = math.log(2.0)

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _install_position_hook(self) -> None:
        # M-RoPE: Qwen's own forward continues cached calls from `rope_deltas`; the hook only
        # sets them from explicit positions (see `_rope_deltas_from_positions`).
        inner = self.model.model
        if not getattr(inner, "_mc_rope_deltas_hook", False):
            inner.register_forward_pre_hook(_rope_deltas_from_positions, with_kwargs=True)
            inner._mc_rope_deltas_hook = True

    def _original_positions(self, model_inputs) -> Tensor:
        """(3, B, L) M-RoPE positions of the uncompressed input, as the model computes them."""
        types = model_inputs.get("mm_token_type_ids")
        if types is None:
            raise ValueError(
                "model_inputs has no 'mm_token_type_ids' (returned by the Qwen processor)"
            )
        orig, _ = self.model.model.get_rope_index(
            model_inputs["input_ids"],
            mm_token_type_ids=types,
            image_grid_thw=model_inputs["image_grid_thw"],
            attention_mask=model_inputs.get("attention_mask"),
        )
        return orig

    def _patch_order(self, hidden: Tensor, thw: Tensor) -> Tensor:
        """The tower's hidden states [S, dv] in the processor's patch order (Qwen2-VL: as is;
        a tower that permutes patches into windows overrides this)."""
        return hidden

    def _grids(self, model_inputs) -> list[tuple[int, int]]:
        thw = model_inputs.get("image_grid_thw")
        if thw is None:
            raise ValueError("model_inputs has no 'image_grid_thw' (no image in this batch?)")
        grids = []
        for i, (t, h, w) in enumerate(thw.tolist()):
            if t != 1:
                raise ValueError(f"image_grid_thw[{i}] = {(t, h, w)}: only still images (t = 1)")
            grids.append((h // self.merge, w // self.merge))
        return grids

    def placeholder_counts(self, model_inputs) -> list[int]:
        return [h * w for h, w in self._grids(model_inputs)]

    def _features(self, model_inputs, *, hidden: bool = False) -> BaseModelOutputWithPooling:
        if model_inputs.get("pixel_values") is None:
            raise ValueError("model_inputs has no 'pixel_values' (no image in this batch?)")
        kwargs = {"output_hidden_states": True} if hidden else {}
        return self.model.model.get_image_features(
            model_inputs["pixel_values"], model_inputs["image_grid_thw"], return_dict=True, **kwargs
        )

    def visual_tokens(self, model_inputs) -> list[Tensor]:
        return list(self._features(model_inputs).pooler_output)

    def contexts(self, model_inputs, need=frozenset()):
        from mc_core.compressors import TokenContext

        need = self._check_need(need)
        grids = self._grids(model_inputs)
        device = model_inputs["image_grid_thw"].device
        recv = keys = None
        if need & {"cls_attention", "keys"}:
            recv, keys = self._received_attention_and_keys(model_inputs)
        return [
            TokenContext(
                positions=grid_positions(h, w, device=device),
                grid=(h, w),
                cls_attention=recv[i] if recv is not None and "cls_attention" in need else None,
                keys=keys[i] if keys is not None and "keys" in need else None,
            )
            for i, (h, w) in enumerate(grids)
        ]

    def _last_block_attention(
        self, model_inputs
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """The tower's last block, recomputed: attention per image and what it acts on.

        Returns:
            probs: per image [H, S_i, S_i] float32 attention over that image's patches.
            values: per image [H, S_i, dh].
            h_in, h_out: [S, dv] the block's input and output (the tower's own hidden states).
            All in the processor's patch order (`_patch_order`: windowed towers undo theirs).
        """
        visual = self.model.model.visual
        thw = model_inputs["image_grid_thw"]
        out = self._features(model_inputs, hidden=True)
        block = visual.blocks[-1]
        h_in, h_out = out.hidden_states[-2], out.hidden_states[-1]  # (S, dv), tower order
        h_in, h_out = self._patch_order(h_in, thw), self._patch_order(h_out, thw)
        position_ids = get_vision_position_ids(thw, visual.spatial_merge_size)
        cos, sin = visual.rotary_pos_emb(h_in, position_ids)
        heads = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(h_in))  # (S, 3 dv)
        q, k, v = qkv.reshape(qkv.shape[0], 3, heads, -1).unbind(1)  # (S, H, dh) each
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        probs, values = [], []
        start = 0
        for t, hh, ww in thw.tolist():
            s = slice(start, start + t * hh * ww)
            start = s.stop
            probs.append(
                attention_probs(q[s].transpose(0, 1), k[s].transpose(0, 1), block.attn.scaling)
            )  # (H, S_i, S_i)
            values.append(v[s].transpose(0, 1))
        return probs, values, h_in, h_out

    def _received_attention_and_keys(self, model_inputs) -> tuple[list[Tensor], list[Tensor]]:
        probs, _, h_in, _ = self._last_block_attention(model_inputs)
        block = self.model.model.visual.blocks[-1]
        unit = self.merge**2
        dv = h_in.shape[-1]
        keys = block.attn.qkv(block.norm1(h_in))[:, dv : 2 * dv]  # (S, dv) before rotary
        recv_all, keys_all = [], []
        start = 0
        for p in probs:
            s = slice(start, start + p.shape[-1])
            start = s.stop
            received = p.mean(dim=(0, 1))  # (S_i,) mean over heads and queries
            recv_all.append(received.reshape(-1, unit).mean(1))  # (n_i,) per merged token
            keys_all.append(keys[s].reshape(-1, unit, dv).mean(1))  # (n_i, dv)
        return recv_all, keys_all

    def _mm_encoder_inputs(
        self, model_inputs, tokens: list[Tensor], slots: list[ImageSlot], rewritten: dict
    ) -> dict[str, Any]:
        grids = self._grids(model_inputs)
        thw = model_inputs["image_grid_thw"]
        kept = []
        types = rewritten.get("mm_token_type_ids")
        if types is None:
            raise ValueError(
                "model_inputs has no 'mm_token_type_ids' (returned by the Qwen processor)"
            )
        for i, (slot, (h, w)) in enumerate(zip(slots, grids, strict=True)):
            m = slot.count
            if m == h * w:
                kept.append(thw[i].tolist())
                continue
            hh, ww, err = factor_grid(m, h, w)
            if err <= self.max_aspect_error + 1e-9:
                kept.append([1, hh * self.merge, ww * self.merge])
            else:  # no good grid: plain 1-D text positions for these tokens
                types[slot.row, slot.start : slot.start + m] = 0
        out: dict[str, Any] = {
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(tokens))},
            "mm_token_type_ids": types,
        }
        if kept:
            out["image_grid_thw"] = torch.tensor(kept, dtype=thw.dtype, device=thw.device)
        return out
