"""Where compressed tokens sit in the sequence under ``positions="source"``.

Token j of image i takes the P-weighted mean of its sources' positions; text keeps its
uncompressed positions. 1-D RoPE models get explicit `position_ids` and a forward pre-hook that
continues cached forwards after them (`rope_deltas`, as Qwen keeps). `grid_positions` gives the
(row, col) of a token grid for the token contexts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mc_core.models.adapters.placeholders import rewrite_placeholders

__all__ = ["grid_positions", "install_position_hook", "original_positions", "positions_from_p"]


def grid_positions(h: int, w: int, *, device=None) -> Tensor:
    """Cell centres (row, col) in [0, 1] of a row-major h x w grid."""
    r = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    c = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(h * w, 2)  # (h*w, 2)


def _continue_after_positions(module, args, kwargs):
    """Forward pre-hook on a 1-D RoPE LVLM's inner model (installed by `positions="source"`
    adapters), mirroring what Qwen does with its `rope_deltas`:

    - on a fresh prefill with explicit `position_ids` [B, L] (those `inputs_with` builds), it
      records `rope_deltas` [B, 1] = last position + 1 - L, so the next token continues after
      the last position used (stock forwards would continue from the cache length);
    - on a cached forward without `position_ids` (a later turn, a decoding step) it passes
      `cache length + arange + rope_deltas`;
    - a fresh prefill without positions clears it (the stock layout needs no shift).
    """
    pos = kwargs.get("position_ids")
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:
        module.rope_deltas = None
        if isinstance(pos, Tensor) and pos.dim() == 2:
            width, pos = pos.shape[1], pos.detach().float()
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                pos = pos.masked_fill(~mask.bool(), float("-inf"))
            module.rope_deltas = pos.amax(dim=1, keepdim=True) + 1 - width  # (B, 1)
        return None
    if pos is not None or getattr(module, "rope_deltas", None) is None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)  # some wrappers pass it by position
    embeds = kwargs.get("inputs_embeds")
    length = (ids if ids is not None else embeds).shape[1]
    delta = module.rope_deltas
    steps = torch.arange(past, past + length, device=delta.device, dtype=delta.dtype)
    kwargs["position_ids"] = steps[None] + delta  # (B, length)
    return args, kwargs


def install_position_hook(model) -> None:
    """1-D RoPE families: continue cached forwards after explicit positions (see above)."""
    inner = model.model
    if not getattr(inner, "_mc_position_hook", False):
        inner.register_forward_pre_hook(_continue_after_positions, with_kwargs=True)
        inner._mc_position_hook = True
        inner.rope_deltas = None


def original_positions(model_inputs) -> Tensor:
    """[D, B, L] positions of the uncompressed input (D = 1 for 1-D RoPE): each valid
    token's index among the row's valid tokens (padding: 0)."""
    ids = model_inputs["input_ids"]
    mask = model_inputs.get("attention_mask")
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device).expand(1, *ids.shape)
    return ((mask.long().cumsum(-1) - 1).clamp(min=0))[None]


def positions_from_p(
    model_inputs,
    P: list[Tensor],
    rewritten: dict,
    orig: Tensor,
    *,
    image_token_id: int,
    counts: list[int],
    pad_token_id: int,
) -> dict[str, Any]:
    """`position_ids` of the rewritten sequence: token j of image k at P_k[j] @ (positions
    of image k's tokens), text at its original position. Float32, differentiable w.r.t. P;
    [B, L] for 1-D RoPE, [D, B, L] otherwise."""
    ids = model_inputs["input_ids"]
    _, slots_in = rewrite_placeholders(
        model_inputs, image_token_id, counts, counts, pad_token_id=pad_token_id
    )
    mask_in = model_inputs.get("attention_mask")
    mask_out = rewritten.get("attention_mask")
    ids_out = rewritten["input_ids"]
    rows = []
    for b in range(ids.shape[0]):
        valid = torch.ones_like(ids[b], dtype=torch.bool) if mask_in is None else mask_in[b].bool()
        starts = {s.start: k for k, s in enumerate(slots_in) if s.row == b}
        cols, j = [], 0
        while j < ids.shape[1]:
            if j in starts:
                k = starts[j]
                src = orig[:, b, j : j + counts[k]].to(ids_out.device, torch.float32)
                p = P[k].to(ids_out.device, torch.float32)
                cols.append(src @ p.T)  # (D, m_k)
                j += counts[k]
                continue
            if valid[j]:
                cols.append(orig[:, b, j : j + 1].to(ids_out.device, torch.float32))
            j += 1
        row = torch.cat(cols, dim=1)  # (D, L_valid_out)
        full = row.new_zeros((row.shape[0], ids_out.shape[1]))
        if mask_out is None:
            full = full + row
        else:
            full = full.masked_scatter(mask_out[b].bool()[None], row)
        rows.append(full)
    pos = torch.stack(rows, dim=1)  # (D, B, L_out)
    return {"position_ids": pos[0] if pos.shape[0] == 1 else pos}
