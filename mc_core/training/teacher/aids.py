"""Training-only aids: the supervision that lets a tiny LVLM leave chance on a CPU budget.

Plain from-scratch training stalls at chance: at init the answer attends almost uniformly over
n visual tokens and an object covers 1-2% of them. The aids change the learning problem, and are
discarded afterwards (the saved teacher is a plain transformers model):

- stage 1: the first channels of each visual token are read as logits of the token's labels
  (colour, shape, region, centre), so the projector hands the LLM linearly readable tokens;
- stage 2/3: three heads of LLM layer 0 attend to the question's slot words, a read-out after
  layer 0 decodes those slots, and one head of the LAST layer points at the asked object's centre
  token (head 0) or at a sink plus the matching centres for count / existence (head 1). The
  pointer sits on the last layer so that earlier layers (FastV reads layer 2) stay ordinary;
- rotary-only towers (Qwen2-VL): a read-out of each visual token's region after layer 0, so the
  LLM learns where a token is from its M-RoPE position.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mc_core.data import synthetic as S
from mc_core.training.teacher.layout import LABEL_KEYS, Example, label_sizes

__all__ = ["Aids", "aid_losses", "label_loss"]


class Aids(nn.Module):
    """Training-only read-outs: stage-1 label slices and stage-2 slot / position probes."""

    def __init__(self, d_text: int, world: S.WorldConfig):
        super().__init__()
        self.sizes = label_sizes(world)
        self.slot_sizes = {
            "type": len(S.QUESTION_TYPES),
            "a": max(world.grid, len(world.colours)),
            "b": max(world.grid, len(world.shapes)),
        }
        self.grid = world.grid
        self.slots = nn.Linear(d_text, sum(self.slot_sizes.values()))
        self.pos = nn.Linear(d_text, 2 * world.grid)

    def split_labels(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first channels of visual tokens read as label logits ``{key: [n, k]}``."""
        out, i = {}, 0
        for k in LABEL_KEYS:
            out[k] = feats[..., i : i + self.sizes[k]]
            i += self.sizes[k]
        return out


def label_loss(
    aids: Aids, feats: torch.Tensor, examples: list[Example], *, rotary: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1: cross-entropy of the label slices of ``feats`` (the examples' tokens, stacked).

    Returns the loss and per-label accuracies (recall for ``centre``)."""
    logits = aids.split_labels(feats)
    lab = {k: torch.from_numpy(np.concatenate([e.labels[k] for e in examples])) for k in LABEL_KEYS}
    loss, accs = feats.new_zeros(()), {}
    for k in LABEL_KEYS:
        if rotary and k in ("row", "col"):
            continue  # a rotary-only tower cannot know absolute positions
        y = lab[k]
        if k == "shape":
            # Shape is read at object centres only (what the LLM attends to); elsewhere a token
            # sees a sliver of the object and the label is ill-posed.
            y = torch.where(lab["centre"] == 1, y, torch.full_like(y, -100))
        weight = torch.tensor([1.0, 8.0]) if k == "centre" else None  # ~3% positives
        loss = loss + F.cross_entropy(logits[k], y, weight=weight, ignore_index=-100)
        ok = (y == 1) if k == "centre" else (y != -100)
        accs[k] = (logits[k].argmax(-1)[ok] == y[ok]).float().mean().item()
    return loss, accs


def aid_losses(
    aids: Aids,
    out,
    batch,
    *,
    rotary: bool,
    image_token_id: int,
    pointer_layers: tuple[int, ...] = (-1,),
) -> dict[str, torch.Tensor]:
    """Stage 2/3 aid losses of a forward ``out`` (attentions + hidden states) on ``batch``;
    the object pointer is supervised on each of ``pointer_layers``."""
    att0 = out.attentions[0]  # (B, H, T, T)
    # One gather per layer: per-entry indexing would build a full-size gradient each time.
    i0 = batch.slot_index  # (4, 3A): batch row, head, query, key
    att = -torch.log(att0[i0[0], i0[1], i0[2], i0[3]] + 1e-6).sum()
    iL, wL = batch.look_index, batch.look_weight  # (4, K), (K,)
    for layer in pointer_layers:
        att_l = out.attentions[layer]
        att = att - (torch.log(att_l[iL[0], iL[1], iL[2], iL[3]] + 1e-6) * wL).sum()
    att = att / len(batch.ans_ids)
    h1 = out.hidden_states[1][batch.ans_pos[:, 0], batch.ans_pos[:, 1]]  # (A, d) after layer 0
    parts = aids.slots(h1).split(list(aids.slot_sizes.values()), dim=-1)
    slot = sum(F.cross_entropy(p, batch.slot_targets[:, j]) for j, p in enumerate(parts))
    losses = {"att": att, "slot": slot}
    if rotary:
        # No absolute positions in the tower: layer 0 must derive each token's region from
        # M-RoPE for the last layer's lookup; this read-out teaches it to.
        vis = batch.inputs["input_ids"] == image_token_id  # (B, T)
        pos = aids.pos(out.hidden_states[1][vis]).split(aids.grid, dim=-1)
        losses["pos"] = sum(
            F.cross_entropy(p, batch.vis_rowcol[j], ignore_index=-100) for j, p in enumerate(pos)
        )
    return losses
