"""HoloV: share the budget among crops of the image, keep each crop's top [CLS]-attention tokens.

Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context
Retention", NeurIPS 2025, arXiv 2510.02912. Reference code: github.com/obananas/HoloV, function
``HoloV`` in ``llava/model/utils.py`` (commit 1d2e65e), called by ``llava/model/llava_arch.py``
with ``num_patches=16`` on the projector outputs and the head-averaged [CLS] attention of the
feature layer (``clip_encoder.py``). We follow that function; ``tests/test_holov.py`` checks the
kept sets against it, run unmodified on fixed inputs (``tests/fixtures/baselines/holov.json``).

Algorithm (reference code). The n tokens, in sequence order, are cut into ``crops`` contiguous
runs (``n // crops`` tokens each, the first ``n % crops`` runs one more, empty runs dropped). Run
c scores ``mean_i(1e3 a_i + alpha v_i s_c)``, with ``a`` the [CLS] attention, ``v_i`` the
variance of token i's cosine similarities (tokens ``x``, the LLM-space projector outputs, as in
the reference) to its run, and ``s_c = mean|1e3 a| / (mean|v| + 1e-6)``. Budgets are
``floor(m w_c)`` with ``w_c = score_c / (sum score + 1e-6)``, the shortfall one each to the
largest ``w_c``; a run keeps its top-attention tokens.

Paper vs code (we follow the code):

- The paper distributes the budget over "spatial crops"; the code's crops are contiguous runs of
  the token sequence (1.5 rows of LLaVA-1.5's 24 x 24 grid at 16 crops), not 2-D blocks. So the
  method needs neither ``grid`` nor ``positions`` and runs on any layout.
- The holistic (similarity-variance) term is rescaled to the crop's mean attention, so a crop's
  score is ``1e3 mean(a) (1 + alpha mean(v) / (mean(v) + 1e-6))``: in effect the budget follows
  each crop's mean attention, the variance only entering through that near-1 factor.

Adaptations to our contract:

- Overflow. When a crop's budget exceeds its size, the reference keeps the whole crop, drops the
  excess and zero-pads the output to m rows (zero vectors reach the LLM). P must have m valid
  rows, so the surplus goes to the crops with room by the same rule (floor of the renormalised
  weights, the shortfall to the largest), repeated until m tokens are kept. Without overflow
  the kept set is the reference's; with it, a superset of the reference's real tokens.
- Quirks kept: a single-token crop (only when n < 2 crops) scores its raw attention (no 1e3
  factor); the similarity variance counts the masked diagonal as a 0 entry.
- Scores are float64 (reference: fp16 tokens, fp32 attention); negative attention is clamped
  to 0 (adapters give probabilities). The kept tokens are returned in their original order
  (the reference concatenates crops, each in attention order).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor

_EPS = 1e-6  # the reference's `esp`
_ATTN_SCALE = 1e3  # the reference scales attention by 1e3 before adding the variance term


@register("holov")
class HoloVCompressor(Compressor):
    """Crop budgets by attention + similarity variance (HoloV, NeurIPS 2025, arXiv 2510.02912)."""

    needs = frozenset({"cls_attention"})

    def __init__(self, *, rate: float, dim: int, crops: int = 16, alpha: float = 0.09) -> None:
        super().__init__(rate=rate, dim=dim)
        if isinstance(crops, bool) or not isinstance(crops, numbers.Integral) or crops < 1:
            raise ValueError(f"holov crops must be a positive int, got {crops!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise ValueError(f"holov alpha must be a finite number >= 0, got {alpha!r}")
        self.crops = int(crops)  # the reference's num_patches (16 for LLaVA-1.5)
        self.alpha = float(alpha)  # weight of the similarity-variance term (0.09)

    def config(self) -> dict:
        return {"crops": self.crops, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, crops={self.crops}, alpha={self.alpha}"

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        feats = x.detach().to(torch.float64)
        attn = context_tensor(ctx.cls_attention, x).to(torch.float64).clamp_min(0)  # (n,)
        base, extra = divmod(n, self.crops)
        sizes = [base + (c < extra) for c in range(self.crops)]
        sizes = [s for s in sizes if s > 0]
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        spans = list(zip(starts, sizes, strict=True))  # (start, size) of each crop
        scores = torch.stack([self._score(feats[a : a + s], attn[a : a + s]) for a, s in spans])
        weights = scores / (scores.sum() + _EPS)  # (crops,)
        take = _allocate(weights.cpu(), torch.tensor(sizes), m)
        index = torch.cat(
            [
                a + attn[a : a + s].topk(k).indices
                for (a, s), k in zip(spans, take.tolist(), strict=True)
                if k > 0
            ]
        )
        return self._select(x, index.sort().values)

    def _score(self, f: Tensor, a: Tensor) -> Tensor:
        s = f.shape[0]
        if s == 1:
            return a.mean()  # the reference's single-token crops: raw attention, no 1e3
        f = f / (f.norm(dim=1, keepdim=True) + _EPS)
        sim = (f @ f.T) * (1 - torch.eye(s, dtype=f.dtype, device=f.device))  # (s, s)
        mean = sim.sum(dim=1) / (s - 1)
        var = ((sim - mean.unsqueeze(1)) ** 2).sum(dim=1) / (s - 1)  # (s,)
        a = a * _ATTN_SCALE
        scale = a.abs().mean() / (var.abs().mean() + _EPS)
        return (a + self.alpha * (var * scale)).mean()


def _allocate(weights: Tensor, sizes: Tensor, m: int) -> Tensor:
    """Tokens per crop: the reference's floor + largest-weight shortfall, then the overflow.

    Args:
        weights: [c] float64 crop weights (non-negative, summing to about 1).
        sizes: [c] int64 crop sizes (sum >= m).
        m: Total budget.

    Returns:
        [c] int64 tokens per crop, each <= its size, summing to m.
    """
    alloc = (weights * m).floor().long()
    short = m - int(alloc.sum())
    if short > 0:
        alloc[weights.topk(min(short, weights.numel())).indices] += 1
    take = torch.minimum(alloc, sizes)
    # Where the reference would zero-pad (a crop's budget above its size), hand the surplus to
    # the crops with room by the same rule, until m tokens are kept (sum(sizes) = n >= m).
    left = m - int(take.sum())
    while left > 0:
        room = sizes - take
        open_ = room > 0
        w = torch.where(open_, weights, torch.zeros_like(weights))
        total = float(w.sum())
        add = (w / total * left).floor().long() if total > 0 else torch.zeros_like(take)
        if int(add.sum()) > left:  # float rounding: fall back to the one-each rule
            add.zero_()
        short = left - int(add.sum())
        if short > 0:
            key = torch.where(open_, w, torch.full_like(w, -math.inf))
            add[key.topk(min(short, int(open_.sum()))).indices] += 1
        take = take + torch.minimum(add, room)
        left = m - int(take.sum())
    return take
