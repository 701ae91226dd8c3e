"""Training losses of MetaCompress (arXiv 2603.21701, Sec. 4.2): the one copy.

Training (``mc_core.train``), evaluation (``mc_core.evaluate``'s KL to the full model) and the
tests all call these functions.

``L = KL(p_full || p_comp) + lambda_ent * mean_i H(P_i,:) + lambda_col * max_j sum_i P_ij``:
the KL keeps the compressed model's answers close to the uncompressed teacher's, the entropy
term pushes rows of P towards decisive (low-entropy) choices, and the collapse term stops many
rows from piling onto the same input tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["align_from_end", "answer_kl", "collapse", "row_entropy", "total_loss"]

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
    teacher_logits: Tensor,
    student_logits: Tensor,
    P: Tensor | list[Tensor],
    *,
    mask: Tensor | None = None,
    lambda_ent: float = 1.0,
    lambda_col: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """The paper's objective ``KL + lambda_ent * entropy + lambda_col * collapse``.

    Returns:
        ``(loss, parts)`` with ``parts = {"kl", "entropy", "collapse", "loss"}`` as floats for
        logging.
    """
    kl = answer_kl(teacher_logits, student_logits, mask)
    ent = row_entropy(P)
    col = collapse(P)
    loss = kl + lambda_ent * ent + lambda_col * col
    parts = {"kl": kl.item(), "entropy": ent.item(), "collapse": col.item(), "loss": loss.item()}
    return loss, parts
