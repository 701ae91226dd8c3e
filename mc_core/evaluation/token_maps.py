"""Where each compressor draws its tokens from, per image: the column mass of P, for plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mc_core.evaluation.runner import row_images
from mc_core.inference.compress import compress_inputs
from mc_core.inference.dialogue import render, to_device
from mc_core.models.families import adapter_for
from mc_core.runtime import model_device

__all__ = ["token_maps"]


@torch.no_grad()
def token_maps(
    model,
    processor,
    dataset,
    compressors: Mapping[str, Any],
    *,
    indices: Sequence[int] = (0, 1, 2),
    adapter=None,
) -> list[dict[str, Any]]:
    """Where each compressor draws its tokens from, per image (for plots).

    For each dialogue in `indices`, each compressor compresses the first image with the first
    turn's prompt (what a conversation does) and the column mass of its P (`P.sum(0)`, [n]:
    how much of each visual token ends up in the kept ones) is returned with the tokens'
    layout.

    Returns:
        One dict per dialogue: `image` (PIL), `dialogue_id`, `question` (turn 1),
        `positions` ([n, 2] (row, col) in [0, 1] or None), `grid` ((h, w) or None),
        `mass` {name: Tensor [n]}.
    """
    adapter = adapter if adapter is not None else adapter_for(model)
    device = model_device(model)
    from mc_core.data import schema

    out = []
    for i in indices:
        row = schema.row(dataset, i)
        images = row_images(row)
        text = render(processor, row["questions"][:1], [], n_images=len(images))
        inputs = dict(processor(text=[text], images=images, return_tensors="pt"))
        inputs = to_device(inputs, device, next(model.parameters()).dtype)
        ctx = adapter.contexts(inputs)[0]
        entry = {
            "image": images[0],
            "dialogue_id": row.get("dialogue_id", str(i)),
            "question": row["questions"][0],
            "positions": None if ctx.positions is None else ctx.positions.detach().cpu(),
            "grid": ctx.grid,
            "mass": {},
        }
        for name, comp in compressors.items():
            adapter.reset_state()
            _, _, ps = compress_inputs(model, adapter, comp.to(device).eval(), inputs)
            entry["mass"][name] = ps[0].sum(0).detach().float().cpu()
        out.append(entry)
    return out
