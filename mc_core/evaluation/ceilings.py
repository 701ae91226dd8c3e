"""Ceilings beside every cell: what a perfect selector and a per-dialogue optimum P reach.

- **selector**: the ground-truth object-centre tokens (the token nearest each object's centre),
  filled up to m with equidistant tokens, packed in source order. The best a prompt-agnostic
  selector can hope for where answers are about objects. It needs per-image object ground truth
  in the dataset (the optional ``object_centres`` column); datasets without it skip it.
- **oracle**: the paper's per-dialogue optimum (arXiv 2603.21701, section 4): a free
  ``P_raw`` [m, n] per dialogue, ``P = softmax_row(P_raw)``, optimised with Adam for a fixed
  number of steps on KL(full || compressed) over that dialogue's gold answer tokens plus
  ``eps`` times the mean row entropy. A ceiling for any P, measured on a seeded subsample.
- **cls_overlap** (the paper's Figure 1 analysis): the share of the oracle's highest-mass
  tokens (``P.sum(0)``) that are also among the top [CLS]-attention tokens; chance is m / n.

The evaluation loop itself (conversations, scoring) is ``mc_core.evaluation.runner``'s; this module
builds the P matrices and the compressor that replays them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mc_core.compressors.base import Compressor, TokenContext
from mc_core.compressors.ops import kept_tokens, pool_matrix, selection_matrix
from mc_core.training.losses import answer_kl, row_entropy

__all__ = [
    "PlanCompressor",
    "cls_overlap",
    "object_tokens",
    "oracle_matrix",
    "selector_matrix",
]

GT_COLUMN = "object_centres"


def selector_matrix(keep_indices: Sequence[int] | Tensor, n: int, m: int) -> Tensor:
    """One-hot P [m, n] keeping ``keep_indices`` (deduplicated), filled or thinned to m.

    Fewer than m indices: the rest are equidistant over the tokens not yet kept (Sample's rule
    on what is left). More than m: an equidistant subset of them. Rows are in ascending source
    order (packed: the kept tokens keep their relative order).

    Raises:
        ValueError: ``m`` not in [1, n] or an index outside [0, n).
    """
    if not 1 <= m <= n:
        raise ValueError(f"selector_matrix needs 1 <= m <= n, got n = {n}, m = {m}")
    keep = sorted({int(i) for i in torch.as_tensor(keep_indices).reshape(-1).tolist()})
    if keep and (keep[0] < 0 or keep[-1] >= n):
        raise ValueError(f"selector indices must lie in [0, {n}), got {keep[0]}..{keep[-1]}")
    if len(keep) > m:
        pick = torch.linspace(0, len(keep) - 1, m, dtype=torch.float64).round().long()
        keep = [keep[int(i)] for i in pick]
    elif len(keep) < m:
        taken = set(keep)
        rest = [j for j in range(n) if j not in taken]
        pick = torch.linspace(0, len(rest) - 1, m - len(keep), dtype=torch.float64).round().long()
        keep = sorted(keep + [rest[int(i)] for i in pick])
    return selection_matrix(torch.tensor(keep, dtype=torch.long), n)


def object_tokens(centres: Sequence[Sequence[float]] | Tensor, positions: Tensor) -> Tensor:
    """Index of the token nearest each object centre.

    Args:
        centres: [k, 2] (row, col) in [0, 1] of each object on the image.
        positions: [n, 2] (row, col) in [0, 1] of each token (``TokenContext.positions``).

    Returns:
        [k] long (k = 0 gives an empty tensor).
    """
    c = torch.as_tensor(centres, dtype=torch.float32).reshape(-1, 2)
    if c.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    d = torch.cdist(c, positions.detach().float().cpu())  # (k, n)
    return d.argmin(dim=1)


Plan = Callable[[int, TokenContext], Tensor]


class PlanCompressor(Compressor):
    """Replays one planned P per image, in call order (the order conversations compress in).

    Each plan maps ``(n, ctx)`` to P [m, n]; ``remaining`` must be 0 once the batch is done.
    Not in the registry: a measuring device for ceilings, not a method.
    """

    name = "plan"

    def __init__(self, *, rate: float, dim: int, plans: Sequence[Plan]) -> None:
        super().__init__(rate=rate, dim=dim)
        self._plans = list(plans)

    @property
    def remaining(self) -> int:
        """Plans not consumed yet."""
        return len(self._plans)

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        if not self._plans:
            raise ValueError("PlanCompressor: more images compressed than plans given")
        P = self._plans.pop(0)(x.shape[0], ctx)
        if tuple(P.shape) != (self.kept(x.shape[0]), x.shape[0]):
            raise ValueError(
                f"PlanCompressor: planned P {tuple(P.shape)} does not fit "
                f"m = {self.kept(x.shape[0])}, n = {x.shape[0]}"
            )
        return self._merge(x, P)


def selector_plan(centres: Sequence[Sequence[float]], rate: float) -> Plan:
    """The selector's plan for one image: its object-centre tokens, filled up to m."""

    def plan(n: int, ctx: TokenContext) -> Tensor:
        if ctx.positions is None:
            raise ValueError("selector ceiling needs TokenContext.positions from the adapter")
        return selector_matrix(object_tokens(centres, ctx.positions), n, kept_tokens(n, rate))

    return plan


def fixed_plan(P: Tensor) -> Plan:
    """A plan that returns ``P`` (the oracle's optimum) for its image."""
    return lambda n, ctx: P


def oracle_matrix(
    model,
    adapter,
    full_inputs: dict[str, Any],
    answer_positions: Tensor,
    teacher_logits: Tensor,
    rate: float,
    *,
    steps: int,
    lr: float,
    eps: float,
    seed: int = 0,
) -> tuple[Tensor, float]:
    """The per-dialogue optimum P [m, n] for a one-image, teacher-forced gold dialogue.

    Args:
        model: the frozen LVLM (gradients flow to ``P_raw`` only).
        adapter: its family adapter.
        full_inputs: the gold dialogue's model inputs (``encode_dialogue``), on the device.
        answer_positions: [T] logit positions of the answer tokens in ``full_inputs``.
        teacher_logits: [T, V] the uncompressed model's logits there.
        rate: reduction rate (m = kept_tokens(n, rate)).
        steps, lr, eps: Adam steps, learning rate and row-entropy weight.
        seed: the initial logits' noise.

    Returns:
        ``(P, kl)``: the optimised P (detached, float32) and the KL of its last step.
    """
    with torch.no_grad():
        x = adapter.visual_tokens(full_inputs)
        ctx = adapter.contexts(full_inputs)
    if len(x) != 1:
        raise ValueError(f"oracle_matrix handles one image per dialogue, got {len(x)}")
    x, grid = x[0].detach().float(), ctx[0].grid
    n = x.shape[0]
    m = kept_tokens(n, rate)
    gen = torch.Generator().manual_seed(int(seed))
    # Start at pooling (every token reachable), sharpened, with a little noise to break ties.
    init = pool_matrix(n, m, grid).clamp_min(1e-3).log()
    init = init + 0.01 * torch.randn(init.shape, generator=gen)
    p_raw = torch.nn.Parameter(init.to(x.device))
    opt = torch.optim.Adam([p_raw], lr=lr)
    dtype = next(model.parameters()).dtype
    n_full = int(full_inputs["input_ids"].shape[1])
    kl = torch.tensor(float("nan"))
    # Only P_raw learns: the LVLM's own gradients would be wasted work (flags restored after).
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for _ in range(int(steps)):
            # enable_grad: callers may sit in no_grad, and P_raw needs its gradient.
            with torch.enable_grad():
                kl = _oracle_step(
                    model,
                    adapter,
                    full_inputs,
                    answer_positions,
                    teacher_logits,
                    x,
                    p_raw,
                    opt,
                    eps=eps,
                    dtype=dtype,
                    n_full=n_full,
                )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        adapter.reset_state()
    return torch.softmax(p_raw.detach(), dim=1).float(), float(kl.detach())


def _oracle_step(
    model,
    adapter,
    full_inputs,
    answer_positions,
    teacher_logits,
    x,
    p_raw,
    opt,
    *,
    eps: float,
    dtype,
    n_full: int,
) -> Tensor:
    """One Adam step on KL(full || compressed) + eps * row entropy; returns the KL."""
    P = torch.softmax(p_raw, dim=1)
    y = (P @ x).to(dtype)
    inputs = adapter.inputs_with(full_inputs, [y], P=[P])
    # Answer positions move left by the visual tokens removed before them.
    shift = n_full - int(inputs["input_ids"].shape[1])
    adapter.reset_state()
    keep = (answer_positions - shift).to(x.device)
    logits = model(**inputs, logits_to_keep=keep).logits[0].float()
    kl = answer_kl(teacher_logits, logits)
    loss = kl + eps * row_entropy(P)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return kl.detach()


def cls_overlap(P: Tensor, cls_attention: Tensor) -> float:
    """Share of P's m highest-mass source tokens that are among the m top-[CLS] tokens."""
    m, n = P.shape
    if tuple(cls_attention.shape) != (n,):
        raise ValueError(f"cls_attention has shape {tuple(cls_attention.shape)}, expected ({n},)")
    top_mass = set(P.detach().float().sum(0).topk(m).indices.tolist())
    top_cls = set(cls_attention.detach().float().topk(m).indices.tolist())
    return len(top_mass & top_cls) / m
