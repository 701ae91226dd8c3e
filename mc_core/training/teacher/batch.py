"""Training batches for the LLM stages: dialogues, their visual tokens, optional reduction.

Every row goes through the adapter (``inputs_with``, with P so that positions follow the
family's own packing) and ``mc_core.inference.dialogue.collate``; whole rows also carry the indices
the
aids supervise. Rows with reduced tokens and whole rows are collated into separate batches: a
reduced row is a fraction of a whole one's length, and padding it to full length would waste
most of its compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mc_core.data import synthetic as S
from mc_core.inference.dialogue import collate
from mc_core.training.teacher.encoding import Encoded
from mc_core.training.teacher.layout import Example, look_target, slot_targets

__all__ = ["Batch", "Row", "build_batch", "make_row"]


@dataclass
class Row:
    """One dialogue ready for the LLM (``inputs`` is a batch of one)."""

    inputs: dict
    ans_pos: list[int]
    ans_ids: list[int]
    end_ids: list[int]
    aids: dict | None = None  # slots, looks, slot targets, qtypes, region labels (whole rows)


@dataclass
class Batch:
    inputs: dict
    ans_pos: torch.Tensor  # [A, 2] (row, position) predicting the answers; + 1: the end tokens
    ans_ids: torch.Tensor  # [A]
    end_ids: torch.Tensor  # [A]
    slot_index: torch.Tensor | None = None  # [4, 3A] (row, head, query, key), layer 0
    slot_targets: torch.Tensor | None = None  # [A, 3]
    look_index: torch.Tensor | None = None  # [4, K] (row, head, query, key), last layer
    look_weight: torch.Tensor | None = None  # [K] 1 / |target set|
    vis_rowcol: torch.Tensor | None = None  # [2, visual tokens of the batch] region row / col


def make_row(
    adapter,
    enc: Encoded,
    tokens: torch.Tensor,
    *,
    ex: Example | None,
    dialogue: S.Dialogue,
    world: S.WorldConfig,
    reduced=None,
) -> Row:
    """A row from an encoded dialogue and its image's tokens ``[n, d]``.

    Args:
        ex: the scene's labels: whole rows with ``ex`` carry the aids' targets.
        reduced: ``(Y [m, d], P [m, n])`` to feed instead of the whole tokens.
    """
    n = tokens.shape[0]
    if reduced is None:
        y, p = tokens, torch.eye(n)
    else:
        y, p = reduced
    inputs = adapter.inputs_with(enc.inputs, [y], P=[p])
    if "position_ids" in inputs:
        # Explicit positions make the fake grid redundant, and it is absent for some m.
        inputs.pop("image_grid_thw", None)
    shift = y.shape[0] - n  # every answer comes after the image
    row = Row(inputs, [p_ + shift for p_ in enc.answer_pos], enc.answer_ids, enc.end_ids)
    if reduced is None and ex is not None:
        row.aids = {
            "slots": enc.slots,
            "looks": [
                [0 if j < 0 else enc.image_start + j for j in look_target(ex, t)]
                for t in dialogue.targets
            ],
            "targets": [
                slot_targets(t, q, world)
                for t, q in zip(dialogue.targets, dialogue.question_types, strict=True)
            ],
            "qtypes": list(dialogue.question_types),
            "rowcol": np.stack([ex.labels["row"], ex.labels["col"]]),
        }
    return row


def build_batch(rows: list[Row], pad_token_id: int) -> Batch:
    """Right-padded batch of ``rows`` (all whole or all reduced)."""
    inputs, _ = collate([r.inputs for r in rows], pad_token_id=pad_token_id, side="right")
    ans_pos = [(b, p) for b, r in enumerate(rows) for p in r.ans_pos]
    batch = Batch(
        inputs,
        torch.tensor(ans_pos),
        torch.tensor([a for r in rows for a in r.ans_ids]),
        torch.tensor([e for r in rows for e in r.end_ids]),
    )
    if all(r.aids is not None for r in rows):
        _aid_indices(batch, rows)
    return batch


def _aid_indices(batch: Batch, rows: list[Row]) -> None:
    si, st, li, lw = [], [], [], []
    for b, r in enumerate(rows):
        a = r.aids
        for k, p in enumerate(r.ans_pos):
            si += [(b, h, p, s) for h, s in enumerate(a["slots"][k])]
            st.append(a["targets"][k])
            keys = a["looks"][k]
            # Head 0 looks a region up, head 1 gathers matches (count / exist): one W_q W_k
            # each, so the two kinds of lookup do not fight over the same projection.
            head = 0 if a["qtypes"][k] in ("colour", "shape") else 1
            li += [(b, head, p, key) for key in keys]
            lw += [1.0 / len(keys)] * len(keys)
    batch.slot_index = torch.tensor(si).T
    batch.slot_targets = torch.tensor(st)
    batch.look_index = torch.tensor(li).T
    batch.look_weight = torch.tensor(lw)
    batch.vis_rowcol = torch.from_numpy(np.concatenate([r.aids["rowcol"] for r in rows], axis=1))
