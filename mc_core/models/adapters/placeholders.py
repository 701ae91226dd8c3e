"""Placeholder rewriting: image i's n_i placeholder tokens become m_i, every per-token tensor
follows, and the batch is re-padded on its original side.

Placeholders are split by per-image counts (adjacent images' runs can touch), and each image's
n_i placeholders must be contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ImageSlot", "rewrite_placeholders"]


@dataclass(frozen=True)
class ImageSlot:
    """Where one image's placeholders sit after `rewrite_placeholders`."""

    row: int  # batch row
    start: int  # first placeholder position in the padded output row
    count: int  # number of placeholders (m_i)


def _pad_side(mask: Tensor) -> str | None:
    left = bool((mask[:, 0] == 0).any())
    right = bool((mask[:, -1] == 0).any())
    if left and right:
        raise ValueError("model_inputs['attention_mask'] has padding on both sides")
    return "left" if left else ("right" if right else None)


def _gather_rows(
    ids: Tensor, mask: Tensor, image_token_id: int, counts_in: list[int], counts_out: list[int]
) -> tuple[list[Tensor], list[tuple[int, int, int]]]:
    """Per row, the input indices the rewritten valid tokens copy (image i's first placeholder
    repeated m_i times), and (row, start among valid tokens, m_i) per image."""
    rows: list[Tensor] = []
    slots: list[tuple[int, int, int]] = []
    image = 0
    for b in range(ids.shape[0]):
        valid = mask[b].bool().nonzero().squeeze(1)  # (L_b,)
        row_ids = ids[b, valid]
        pos = (row_ids == image_token_id).nonzero().squeeze(1).tolist()
        index: list[int] = []
        cursor = p = 0
        while p < len(pos):
            if image >= len(counts_in):
                raise ValueError(
                    f"input_ids row {b} has more image placeholders than the {len(counts_in)} "
                    "images' token counts account for"
                )
            n, m = counts_in[image], counts_out[image]
            run = pos[p : p + n]
            if len(run) != n or run[-1] - run[0] != n - 1:
                raise ValueError(
                    f"image {image} (row {b}) expects {n} contiguous placeholders at position "
                    f"{pos[p]}, found {len(run)} spanning {run[-1] - run[0] + 1 if run else 0}"
                )
            index.extend(range(cursor, run[0]))
            slots.append((b, len(index), m))
            index.extend([run[0]] * m)
            cursor = run[0] + n
            p += n
            image += 1
        index.extend(range(cursor, len(row_ids)))
        rows.append(valid[torch.tensor(index, dtype=torch.long, device=ids.device)])
    if image != len(counts_in):
        raise ValueError(
            f"input_ids hold placeholders for {image} images but {len(counts_in)} token sets given"
        )
    return rows, slots


def rewrite_placeholders(
    model_inputs: dict[str, Any],
    image_token_id: int,
    counts_in: list[int],
    counts_out: list[int],
    *,
    pad_token_id: int,
) -> tuple[dict[str, Tensor], list[ImageSlot]]:
    """Replace each image's n_i placeholders with m_i and re-pad the batch.

    Args:
        model_inputs: has `input_ids` [B, L] and optionally `attention_mask` [B, L]; every other
            tensor whose first two dimensions are (B, L) (e.g. `mm_token_type_ids`) is rewritten
            the same way (new placeholders copy the value of the image's first placeholder).
        image_token_id: the placeholder id.
        counts_in: n_i per image, in batch order.
        counts_out: m_i per image (>= 1).
        pad_token_id: used where the output needs padding the input did not have.

    Returns:
        (tensors, slots): the rewritten per-token tensors (`input_ids`, `attention_mask`, ...)
        padded on the input's side (left when the input had no padding), and one `ImageSlot` per
        image.

    Raises:
        ValueError: counts do not match the placeholders, a run is not contiguous, m_i < 1.
    """
    ids = model_inputs["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("model_inputs['input_ids'] must be a [B, L] tensor")
    B, L = ids.shape
    mask = model_inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if len(counts_in) != len(counts_out):
        raise ValueError(
            f"{len(counts_in)} images in model_inputs but {len(counts_out)} token sets"
        )
    for i, m in enumerate(counts_out):
        if m < 1:
            raise ValueError(f"tokens[{i}] has {m} rows; every image needs at least one token")
    extra = {
        k: v
        for k, v in model_inputs.items()
        if isinstance(v, Tensor)
        and v.dim() >= 2
        and tuple(v.shape[:2]) == (B, L)
        and k not in ("input_ids", "attention_mask")
    }
    side = _pad_side(mask) or "left"
    if _pad_side(mask) is not None:
        # Reuse the input's own pad id (any id but the placeholder works: padding is masked).
        pad_token_id = int(ids[mask == 0][0])
    if pad_token_id == image_token_id:
        raise ValueError(f"pad_token_id {pad_token_id} equals the image placeholder id")

    rows, slots_unpadded = _gather_rows(ids, mask, image_token_id, counts_in, counts_out)
    width = max(len(r) for r in rows)
    out = {
        "input_ids": ids.new_full((B, width), pad_token_id),
        "attention_mask": mask.new_zeros((B, width)),
    }
    for k, v in extra.items():
        out[k] = v.new_zeros((B, width, *v.shape[2:]))
    offsets = []
    for b, index in enumerate(rows):
        lo = width - len(index) if side == "left" else 0
        offsets.append(lo)
        sl = slice(lo, lo + len(index))
        out["input_ids"][b, sl] = ids[b, index]
        out["attention_mask"][b, sl] = 1
        for k, v in extra.items():
            out[k][b, sl] = v[b, index]
    slots = [ImageSlot(b, offsets[b] + s, m) for b, s, m in slots_unpadded]
    return out, slots
