"""PruneSID: PCA semantic groups, intra-group NMS on [CLS] attention, budgets by NMS survivors.

Fang et al., "Prune Redundancy, Preserve Essence: Vision Token Compression in VLMs via Synergistic
Importance-Diversity", ICLR 2026, arXiv 2603.09480. Reference code: github.com/ZhengyaoFang/
PruneSID, ``CLIPVisionTower_PruneSID.forward`` with ``batch_pca`` and ``batch_similarity_nms`` in
``prunesid/prunesid_llava/clip_encoder.py`` (commit 4ef17d9), the LLaVA-1.5/NeXT selection. We
follow it; ``tests/test_prunesid.py`` checks the kept sets against it, run on fixed inputs
(``tests/fixtures/baselines/prunesid.json``) with the edits listed below.

Algorithm (reference code, budget m):

1. Groups (PSCA): ``q = m // group_size`` principal components of ``sigmoid(tokens)`` laid out
   features x tokens, each token's column centred (``torch.pca_lowrank``'s centring); a token
   joins the component with its largest absolute loading.
2. NMS: within each group, repeatedly keep the highest-attention remaining token and drop the
   group's tokens whose cosine similarity to it exceeds ``(m / nms_tokens) * mean pairwise
   similarity`` of the image.
3. Budgets: one token per non-empty group, the rest split by the cumulative share of NMS
   survivors (float32, rounded half-to-even); a group gets at most ``group_cap * ceil(m / 64)``
   and no more than its survivors, caps raised by 1 for all groups (to the group size) until
   they total m; the shortfall fills groups in decreasing survivor count.
4. A group keeps its survivors in NMS order, then its other tokens by attention.

Paper vs code (we follow the code): the paper's information-aware dynamic ratio (Sec. 3.4: each
image's budget proportional to 1 - its redundancy) is not in the LLaVA code, which gives every
image the same budget; our contract fixes m too. The image's redundancy enters only through the
NMS threshold, a multiple of its mean similarity. The repository's separate Qwen2-VL variant
(importance = PCA loading instead of [CLS] attention, at least 4 groups and 16 tokens, another
threshold) is not followed: every family gets the LLaVA selection, with the adapter's
``cls_attention`` (for Qwen2-VL, the mean attention a token receives).

Adaptations (the first two, and float64, are source edits in the fixture's reference run):

- No [CLS] slot: the reference spends one of its ``need_token_num`` slots on CLIP's [CLS] token
  (index 0, always kept); our tokens have no [CLS], so all m slots go to patches. The
  hyperparameters (q, threshold, caps) come from m as in the reference.
- Exact PCA: ``torch.pca_lowrank`` is randomized (global RNG, 2 power iterations), so the
  reference's groups change from call to call; we take the exact truncated SVD it approximates
  (on the fixture inputs, budgets 4 to n - 1, 5 seeds each, the randomized version gave the
  exact kept set in 112 of 200 runs). q is at least 1 (the reference crashes for m < 4) and at
  most the centred matrix's rank bound ``min(d - 1, n)`` (the reference needs q <= min(d, n)).
  The loadings come from an eigendecomposition of the smaller Gram matrix (float64), which for
  n of a few thousand costs seconds on a CPU.
- Features: the reference uses the vision tower's hidden states at the feature layer (pre-
  projector) for PCA and similarity; we use ``x``, their token-wise projector image (what its
  own Qwen2-VL variant uses, after the merger). [CLS] attention is head-averaged here, head-summed
  there: the same order, and only the order matters.
- Float64 for PCA and similarity (reference: float32); the budget arithmetic stays float32 as in
  the reference. Ties break by index: equal survivor counts favour the lower (stronger) component
  (the reference's unstable argsort on more than 16 groups is implementation-defined); survivors
  are ordered explicitly, not by the reference's 1000, 999, ... scores (equal for n < ~1000).
- Tokens with zero attention are never NMS survivors (as in the reference) but, unlike there,
  can only fill their own group's budget; if no token has positive attention, the survivor
  shares become group-size shares (the reference divides by zero). m = n keeps every token.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor

_CAP_UNIT = 64  # the group cap is group_cap tokens per started 64 of budget (reference)


@register("prunesid")
class PruneSIDCompressor(Compressor):
    """PCA groups + intra-group NMS (PruneSID, Fang et al., ICLR 2026, arXiv 2603.09480)."""

    needs = frozenset({"cls_attention"})

    def __init__(
        self,
        *,
        rate: float,
        dim: int,
        group_size: int = 4,
        nms_tokens: float = 32.0,
        group_cap: int = 5,
    ) -> None:
        super().__init__(rate=rate, dim=dim)
        for key, value in (("group_size", group_size), ("group_cap", group_cap)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"prunesid {key} must be a positive int, got {value!r}")
        if (
            isinstance(nms_tokens, bool)
            or not isinstance(nms_tokens, numbers.Real)
            or not math.isfinite(nms_tokens)
            or nms_tokens <= 0
        ):
            raise ValueError(f"prunesid nms_tokens must be a finite number > 0, got {nms_tokens!r}")
        self.group_size = int(group_size)  # budget tokens per PCA group (q = m // 4)
        self.nms_tokens = float(nms_tokens)  # NMS threshold = (m / 32) * mean similarity
        self.group_cap = int(group_cap)  # per-group cap: 5 per started 64 tokens of budget

    def config(self) -> dict:
        return {
            "group_size": self.group_size,
            "nms_tokens": self.nms_tokens,
            "group_cap": self.group_cap,
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, group_size={self.group_size}, "
            f"nms_tokens={self.nms_tokens}, group_cap={self.group_cap}"
        )

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n, d = x.shape
        m = self.kept(n)
        if m >= n:
            return self._select(x, torch.arange(n, device=x.device))
        feats = x.detach().to(torch.float64)
        attn = context_tensor(ctx.cls_attention, x).to(torch.float64).clamp_min(0)  # (n,)

        # 1. Principal semantic components: token loadings of the column-centred sigmoid map.
        q = max(1, min(m // self.group_size, d - 1, n))
        a = torch.sigmoid(feats).T  # (d, n)
        group = _top_loadings(a - a.mean(dim=0, keepdim=True), q).abs().argmax(dim=1)  # (n,)
        member = F.one_hot(group, q).T.bool()  # (q, n)

        # 2. Intra-group NMS with a threshold relative to the image's mean similarity.
        u = F.normalize(feats, p=2, dim=-1)
        sim = u @ u.T  # (n, n)
        upper = torch.triu(torch.ones_like(sim), diagonal=1).bool()
        threshold = (m / self.nms_tokens) * ((sim * upper).sum(-1).sum(-1) / upper.sum())
        picks = _nms(sim, attn, member, threshold)  # per group, survivors in NMS order

        # 3. Budgets per group, 4. survivors first, then the group's other tokens by attention.
        counts = member.sum(dim=1).cpu()
        survivors = torch.tensor([p.numel() for p in picks])
        budget = _budgets(counts, survivors, m, self.group_cap * math.ceil(m / _CAP_UNIT))
        chosen = []
        for g, k in enumerate(budget.tolist()):
            if k == 0:
                continue
            rest = member[g].clone()
            rest[picks[g]] = False
            others = rest.nonzero().squeeze(1)
            others = others[attn[others].argsort(descending=True, stable=True)]
            chosen.append(torch.cat([picks[g], others])[:k])
        index = torch.cat(chosen).sort().values
        if index.numel() != m:  # cannot happen: budgets sum to m, each within its group
            raise RuntimeError(f"prunesid selected {index.numel()} tokens, expected {m}")
        return self._select(x, index)


def _top_loadings(a: Tensor, q: int) -> Tensor:
    """The q leading right singular vectors [n, q] of ``a`` [d, n], up to sign.

    From the eigenvectors of the smaller Gram matrix (n x n or d x d) in a's float64: the same
    vectors as ``torch.linalg.svd`` (about 1e-12 apart on LLaVA-sized inputs) at a fraction of
    its cost when d and n are both large (4096 x 2880: seconds instead of a minute on a CPU).
    """
    d, n = a.shape
    if n <= d:
        return torch.linalg.eigh(a.T @ a).eigenvectors.flip(1)[:, :q]
    values, vectors = torch.linalg.eigh(a @ a.T)  # ascending
    u = vectors.flip(1)[:, :q]  # (d, q)
    s = values.flip(0)[:q].clamp_min(0).sqrt().clamp_min(torch.finfo(a.dtype).tiny)
    return (a.T @ u) / s


def _nms(sim: Tensor, score: Tensor, member: Tensor, threshold: Tensor) -> list[Tensor]:
    """Greedy NMS inside each group, all groups at once.

    Args:
        sim: [n, n] token similarity.
        score: [n] non-negative importance; zero-score tokens are never kept (reference).
        member: [q, n] bool, row g marks the tokens of group g (disjoint rows).
        threshold: Scalar; a kept token drops its group's tokens more similar than this.

    Returns:
        q index tensors: each group's kept tokens in the order NMS kept them.
    """
    q = member.shape[0]
    alive = score > 0  # (n,) neither kept nor suppressed yet
    rounds: list[tuple[Tensor, Tensor]] = []
    neg_inf = torch.tensor(-math.inf, dtype=score.dtype, device=score.device)
    while bool(alive.any()):
        masked = torch.where(member & alive, score, neg_inf)  # (q, n)
        best, token = masked.max(dim=1)
        live = (best > -math.inf).nonzero().squeeze(1)  # groups with a candidate left
        token = token[live]
        rounds.append((live, token))
        alive[token] = False
        drop = (sim[token] > threshold) & member[live]  # (groups, n), own group only
        alive &= ~drop.any(dim=0)
    picks: list[list[int]] = [[] for _ in range(q)]
    for live, token in rounds:
        for g, t in zip(live.tolist(), token.tolist(), strict=True):
            picks[g].append(t)
    return [torch.tensor(p, dtype=torch.long, device=score.device) for p in picks]


def _budgets(counts: Tensor, survivors: Tensor, m: int, cap: int) -> Tensor:
    """Tokens per group (the reference's allocation, for one image and no [CLS] slot).

    Args:
        counts: [q] int64 group sizes (sum n >= m).
        survivors: [q] int64 NMS survivors per group.
        m: Total budget.
        cap: Initial per-group cap.

    Returns:
        [q] int64 budgets, each <= its group size, summing to m.
    """
    lower = counts.clamp(max=1)
    upper = torch.minimum(counts.clamp(max=cap), survivors)
    while int(upper.sum()) < m:
        upper = torch.minimum(upper + 1, counts)
    target = max(m, int(lower.sum()))  # lower.sum() <= q <= m: the target is m
    rest = target - int(lower.sum())
    # The reference's float32 arithmetic: cumulative shares, rounded (half to even), differenced.
    base = survivors if int(survivors.sum()) > 0 else counts
    share = base.to(torch.float32) / base.sum().to(torch.float32)
    cum = (torch.cumsum(share, dim=0) * rest).round().long()
    extra = cum - torch.cat([cum.new_zeros(1), cum[:-1]])
    budget = torch.minimum(extra + lower, upper)
    order = torch.argsort(survivors, descending=True, stable=True)
    for g in order.tolist():
        short = target - int(budget.sum())
        if short <= 0:
            break
        budget[g] += min(int(upper[g] - budget[g]), short)
    return budget
