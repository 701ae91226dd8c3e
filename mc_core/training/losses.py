"""Training losses of MetaCompress (arXiv 2603.21701, Sec. 4.2): the one copy.

Training (``mc_core.training.loop``), evaluation (``mc_core.evaluation.runner``'s KL to the full
model) and the
tests all call these functions.

``L = KL(p_full || p_comp) + lambda_ent * mean_i H(P_i,:) + lambda_col * max_j sum_i P_ij``:
the KL keeps the compressed model's answers close to the uncompressed teacher's, the entropy
term pushes rows of P towards decisive (low-entropy) choices, and the collapse term stops many
rows from piling onto the same input tokens.

A real vocabulary (32k-152k) makes the full teacher distribution too large to cache for every
answer token of a training set, so training can distil against a ``TopKTarget`` instead: the
teacher's top-k log-probs, their vocabulary ids and the log of the remaining (tail) mass.
``topk_kl`` is the KL between the two distributions bucketed into those k tokens plus one
"rest" bucket; by the log-sum inequality it never exceeds the full KL, and it equals it when
k = V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TopKTarget",
    "align_from_end",
    "answer_kl",
    "collapse",
    "row_entropy",
    "topk_kl",
    "total_loss",
]

# Probabilities below this count as 0 inside the log of the entropy: p log p -> 0 as p -> 0,
# and clamping keeps the gradient finite where a float32 softmax underflows to exactly 0.
_TINY = 1e-30


def answer_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(p_teacher || p_student) per answer token, averaged over the answer tokens.

    Computed in float32 over the whole vocabulary. The teacher is a fixed target (detached).

    Args:
        teacher_logits: [T, V], or [B, T, V] with ``mask``: logits of the uncompressed model at
            the answer positions.
        student_logits: Same shape: logits of the compressed model at the same answers.
        mask: [B, T] (or [T]) bool, True at real answer tokens (padding False). Optional.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: Shape mismatch, fewer than 2 dims, or no answer token at all.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"answer_kl: teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in shape"
        )
    if teacher_logits.dim() < 2:
        raise ValueError(
            f"answer_kl: logits must be [T, V] or [B, T, V], got {teacher_logits.dim()}-D"
        )
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (..., T)
    if mask is None:
        if per_token.numel() == 0:
            raise ValueError("answer_kl: no answer tokens")
        return per_token.mean()
    if tuple(mask.shape) != tuple(per_token.shape):
        raise ValueError(
            f"answer_kl: mask {tuple(mask.shape)} does not match logits "
            f"{tuple(teacher_logits.shape)}"
        )
    mask = mask.to(device=per_token.device, dtype=torch.bool)
    count = int(mask.sum())
    if count == 0:
        raise ValueError("answer_kl: the mask selects no answer token")
    return per_token[mask].sum() / count


@dataclass
class TopKTarget:
    """A teacher distribution kept as its top-k log-probs plus the log of the rest's mass.

    Attributes:
        values: [T, k] the teacher's k largest log-probs per answer token, descending (float16 in
            the training cache; any float dtype, upcast to float32 by ``topk_kl``).
        index: [T, k] int32 vocabulary ids of ``values``.
        tail: [T] float32 ``log(1 - sum_i exp(values_i))``, computed as the logsumexp of the
            other log-probs (no cancellation when the top-k hold almost all the mass); ``-inf``
            when k = V.
    """

    values: Tensor
    index: Tensor
    tail: Tensor

    @classmethod
    def from_logprobs(cls, log_probs: Tensor, k: int, *, dtype=torch.float16) -> TopKTarget:
        """The top-``k`` (at most V) of ``log_probs`` [T, V]; ``values`` stored as ``dtype``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopKTarget: k={k!r} must be an int >= 1")
        if log_probs.dim() != 2:
            raise ValueError(f"TopKTarget: log-probs must be [T, V], got {tuple(log_probs.shape)}")
        lp = log_probs.detach().float()
        values, index = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tail = lp.scatter(-1, index, float("-inf")).logsumexp(-1)
        return cls(values.to(dtype), index.to(torch.int32), tail)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    def to(self, device) -> TopKTarget:
        return TopKTarget(self.values.to(device), self.index.to(device), self.tail.to(device))

    @staticmethod
    def cat(parts: list[TopKTarget]) -> TopKTarget:
        """Rows of several targets of the same k, in order."""
        ks = {p.k for p in parts}
        if len(ks) != 1:
            raise ValueError(f"TopKTarget.cat: targets of different k {sorted(ks)}")
        return TopKTarget(
            torch.cat([p.values for p in parts]),
            torch.cat([p.index for p in parts]),
            torch.cat([p.tail for p in parts]),
        )


def topk_kl(target: TopKTarget, student_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Bucketed KL(p_teacher || p_student) per answer token over the teacher's top-k + the rest.

    With S the teacher's top-k ids of a token, p_tail = 1 - p(S) and q_tail = 1 - q(S):

        sum_{i in S} p_i log(p_i / q_i)  +  p_tail log(p_tail / q_tail)

    A lower bound of the full KL: by the log-sum inequality,
    ``sum_{i not in S} p_i log(p_i/q_i) >= p_tail log(p_tail/q_tail)``; the gap is
    ``p_tail * KL(p | rest || q | rest)``, so it vanishes when k = V (or the tail holds no mass).
    The teacher's k + 1 buckets are renormalised (a no-op for exact values; for float16 values it
    keeps the bucketed teacher a distribution, so the result stays >= 0). ``log q_tail`` is the
    logsumexp of the student's log-probs off S, not ``log(1 - sum)``, which cancels
    catastrophically when the student agrees with the teacher.

    Args:
        target: the teacher's ``TopKTarget`` for T answer tokens (detached: a fixed target).
        student_logits: [T, V] logits of the compressed model at the same answers.
        mask: [T] bool, True at the tokens to average over. Optional.

    Returns:
        Scalar float32 tensor: the mean over the (masked) answer tokens.

    Raises:
        ValueError: shapes that do not match, or no answer token.
    """
    if student_logits.dim() != 2 or student_logits.shape[0] != len(target):
        raise ValueError(
            f"topk_kl: student logits {tuple(student_logits.shape)} must be [T, V] with T = "
            f"{len(target)}, the target's answer tokens"
        )
    if target.index.shape != target.values.shape or target.tail.shape != (len(target),):
        raise ValueError(
            f"topk_kl: target values {tuple(target.values.shape)}, index "
            f"{tuple(target.index.shape)} and tail {tuple(target.tail.shape)} do not agree"
        )
    log_q_all = F.log_softmax(student_logits.float(), dim=-1)
    index = target.index.long()
    log_q_off = log_q_all.scatter(-1, index, float("-inf"))
    no_tail = torch.isneginf(target.tail.detach())
    # A row with nothing off S (k = V) would give logsumexp a NaN gradient; its term is 0 anyway.
    log_q_off = torch.where(no_tail[:, None], torch.zeros_like(log_q_off), log_q_off)
    log_q = torch.cat([log_q_all.gather(-1, index), log_q_off.logsumexp(-1, keepdim=True)], -1)
    buckets = torch.cat([target.values.float(), target.tail.float()[:, None]], -1)
    log_p = F.log_softmax(buckets.detach(), dim=-1)
    p = log_p.exp()
    zero = torch.zeros_like(log_p)
    # 0 log 0 = 0: empty buckets (the tail at k = V) contribute nothing, not NaN.
    per_token = torch.where(p > 0, p * (torch.where(p > 0, log_p, zero) - log_q), zero).sum(-1)
    if mask is not None:
        if tuple(mask.shape) != (len(target),):
            raise ValueError(f"topk_kl: mask {tuple(mask.shape)} must be [{len(target)}]")
        per_token = per_token[mask.to(device=per_token.device, dtype=torch.bool)]
    if per_token.numel() == 0:
        raise ValueError("topk_kl: no answer tokens")
    return per_token.mean()


def align_from_end(positions: Tensor, full_length: int, compressed_length: int) -> Tensor:
    """The compressed sequence's indices of the full sequence's answer ``positions``.

    The compressed sequence is the full one with ``full_length - compressed_length`` visual
    tokens removed before the text, so every answer token is the same distance from the end in
    both: ``student = positions - (full_length - compressed_length)``. Training and evaluation
    select the student's logits at these indices (``logits_to_keep``) to compare them with the
    uncompressed model's logits at ``positions``.

    Args:
        positions: [T] int indices into the full sequence (as ``encode_dialogue`` returns them).
        full_length: length of the full (uncompressed) sequence.
        compressed_length: length of the compressed sequence (<= ``full_length``).

    Returns:
        [T] long tensor of indices into the compressed sequence, on ``positions``' device.

    Raises:
        ValueError: A position that falls before the compressed sequence or past the end.
    """
    lt, ls = int(full_length), int(compressed_length)
    pos = positions.long()
    if ls > lt or (pos.numel() and (int(pos.min()) < lt - ls or int(pos.max()) >= lt)):
        lo, hi = (int(pos.min()), int(pos.max())) if pos.numel() else (0, -1)
        raise ValueError(
            f"align_from_end: answer positions [{lo}, {hi}] must lie in the last {ls} of the "
            f"full sequence's {lt} positions"
        )
    return pos - (lt - ls)


def _as_list(P: Tensor | list[Tensor]) -> list[Tensor]:
    Ps = list(P) if isinstance(P, (list, tuple)) else [P]
    if not Ps:
        raise ValueError("expected P [m, n] or a non-empty list of them, got an empty list")
    for i, p in enumerate(Ps):
        if p.dim() != 2:
            raise ValueError(f"P {i} must be [m, n], got shape {tuple(p.shape)}")
    return Ps


def row_entropy(P: Tensor | list[Tensor]) -> Tensor:
    """Mean over rows of the entropy H(P_i,:) (nats); for a list, the mean over images."""
    values = []
    for p in _as_list(P):
        p = p.float()
        values.append(-(p * p.clamp_min(_TINY).log()).sum(dim=1).mean())
    return torch.stack(values).mean()


def collapse(P: Tensor | list[Tensor]) -> Tensor:
    """Largest column sum ``max_j sum_i P_ij`` (mass on the most used token); mean over images."""
    return torch.stack([p.float().sum(dim=0).max() for p in _as_list(P)]).mean()


def total_loss(
    teacher_logits: Tensor | TopKTarget,
    student_logits: Tensor,
    P: Tensor | list[Tensor],
    *,
    mask: Tensor | None = None,
    lambda_ent: float = 1.0,
    lambda_col: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """The paper's objective ``KL + lambda_ent * entropy + lambda_col * collapse``.

    ``teacher_logits`` is the teacher's logits or log-probs (the KL over the whole vocabulary,
    ``answer_kl``) or a ``TopKTarget`` (the bucketed KL, ``topk_kl``; ``mask`` then is [T]).

    Returns:
        ``(loss, parts)`` with ``parts = {"kl", "entropy", "collapse", "loss"}`` as floats for
        logging.
    """
    if isinstance(teacher_logits, TopKTarget):
        kl = topk_kl(teacher_logits, student_logits, mask)
    else:
        kl = answer_kl(teacher_logits, student_logits, mask)
    ent = row_entropy(P)
    col = collapse(P)
    loss = kl + lambda_ent * ent + lambda_col * col
    parts = {"kl": kl.item(), "entropy": ent.item(), "collapse": col.item(), "loss": loss.item()}
    return loss, parts
