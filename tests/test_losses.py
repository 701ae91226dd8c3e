"""Losses on hand-made P and logits, where the right answer is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mc_core.training.losses import (
    TopKTarget,
    align_from_end,
    answer_kl,
    collapse,
    row_entropy,
    topk_kl,
    total_loss,
)


def test_entropy_of_one_hot_rows_is_zero():
    P = torch.eye(5)[[0, 2, 4]]
    assert float(row_entropy(P)) == 0.0


def test_entropy_of_uniform_rows_is_log_n():
    # float32 log and sum over 40 entries: 1e-6 relative is ample.
    assert math.isclose(float(row_entropy(torch.full((3, 40), 1 / 40))), math.log(40), rel_tol=1e-6)


def test_entropy_list_is_mean_over_images_and_grad_is_finite():
    P1, P2 = torch.full((2, 8), 1 / 8), torch.eye(4)[:2]
    assert math.isclose(float(row_entropy([P1, P2])), math.log(8) / 2, rel_tol=1e-6)
    # A softmax that underflows to exact zeros must not give NaN gradients.
    logits = torch.tensor([[0.0, -200.0, -200.0]], requires_grad=True)
    row_entropy(torch.softmax(logits, -1)).backward()
    assert torch.isfinite(logits.grad).all()


def test_collapse():
    m, n = 6, 30
    assert math.isclose(float(collapse(torch.full((m, n), 1 / n))), m / n, rel_tol=1e-6)
    everything_on_one = torch.zeros(m, n)
    everything_on_one[:, 3] = 1
    assert float(collapse(everything_on_one)) == m
    assert math.isclose(
        float(collapse([torch.full((m, n), 1 / n), everything_on_one])),
        (m / n + m) / 2,
        rel_tol=1e-6,
    )


def test_kl_zero_for_identical_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 50, generator=g)
    assert abs(float(answer_kl(t, t.clone()))) < 1e-6  # float32 log-softmax round-off
    s = t + torch.randn(7, 50, generator=g)
    kl = float(answer_kl(t, s))
    assert kl > 0
    # Cross-check against the textbook formula in float64.
    p = torch.softmax(t.double(), -1)
    ref = (p * (p.log() - torch.log_softmax(s.double(), -1))).sum(-1).mean()
    assert math.isclose(kl, float(ref), rel_tol=1e-4)
    # Direction matters: KL(p || q) != KL(q || p) in general.
    assert not math.isclose(kl, float(answer_kl(s, t)), rel_tol=1e-3)


def test_kl_batched_with_mask_ignores_padding_and_low_precision_inputs():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    s_pad = s.clone()
    s_pad[~mask] = 1e4  # garbage at padding must not matter
    expect = answer_kl(torch.cat([t[0, :3], t[1, :2]]), torch.cat([s[0, :3], s[1, :2]]))
    torch.testing.assert_close(answer_kl(t, s_pad, mask), expect)
    # bf16 logits are upcast: the result is float32 and close to the float32 KL.
    kl16 = answer_kl(t.bfloat16(), s.bfloat16(), mask)
    assert kl16.dtype == torch.float32
    assert math.isclose(float(kl16), float(answer_kl(t, s, mask)), rel_tol=2e-2)  # bf16 inputs


def test_kl_errors_and_gradient_only_to_student():
    with pytest.raises(ValueError, match="differ in shape"):
        answer_kl(torch.zeros(3, 5), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="no answer token"):
        answer_kl(torch.zeros(1, 3, 5), torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.bool))
    t = torch.randn(4, 9, requires_grad=True)
    s = torch.randn(4, 9, requires_grad=True)
    answer_kl(t, s).backward()
    assert t.grad is None and s.grad is not None


def test_align_from_end():
    teacher = torch.arange(10.0)[:, None].expand(10, 3)  # row value = position
    student = torch.arange(6.0)[:, None].expand(6, 3) + 4  # 4 visual tokens fewer
    pos = torch.tensor([7, 9])
    idx = align_from_end(pos, 10, 6)
    assert idx.tolist() == [3, 5]
    torch.testing.assert_close(teacher[pos], student[idx])
    with pytest.raises(ValueError, match="last 6"):
        align_from_end(torch.tensor([2]), 10, 6)
    with pytest.raises(ValueError, match="last 6"):
        align_from_end(torch.tensor([10]), 10, 6)


def test_total_loss_combines_terms():
    t, s = torch.randn(3, 11), torch.randn(3, 11)
    P = torch.softmax(torch.randn(4, 20), -1)
    loss, parts = total_loss(t, s, P, lambda_ent=0.5, lambda_col=2.0)
    expect = answer_kl(t, s) + 0.5 * row_entropy(P) + 2.0 * collapse(P)
    torch.testing.assert_close(loss, expect)
    assert set(parts) == {"kl", "entropy", "collapse", "loss"}
    assert math.isclose(parts["loss"], float(expect), rel_tol=1e-6)


def _pair(seed: int, t: int = 9, v: int = 40) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = 3 * torch.randn(t, v, generator=g)  # peaked enough that the top-k matter
    return teacher, teacher + torch.randn(t, v, generator=g)


def test_topk_kl_is_a_lower_bound_rising_to_the_full_kl_at_k_equal_v():
    teacher, student = _pair(2)
    log_p = teacher.log_softmax(-1)
    full = answer_kl(teacher, student)
    kls = [
        topk_kl(TopKTarget.from_logprobs(log_p, k, dtype=torch.float32), student)
        for k in (1, 2, 4, 8, 16, 32, 39, 40)
    ]
    # Log-sum inequality: each bucketing is below the full KL, and top-(k+1) refines top-k.
    for a, b in zip(kls, kls[1:], strict=False):
        assert float(a) <= float(b) + 1e-7
    assert float(kls[-2]) <= float(full) + 1e-7 and float(kls[0]) < 0.9 * float(full)
    # k = V: the same sum in another (sorted) order, float32 round-off only.
    torch.testing.assert_close(kls[-1], full, rtol=1e-6, atol=1e-8)
    over = TopKTarget.from_logprobs(log_p, 100, dtype=torch.float32)  # k > V is k = V
    assert over.k == 40 and torch.isneginf(over.tail).all()
    torch.testing.assert_close(topk_kl(over, student), full, rtol=1e-6, atol=1e-8)
    # float16 values (the cache's storage): renormalised buckets keep it close (measured 1e-4).
    half = topk_kl(TopKTarget.from_logprobs(log_p, 40), student)
    assert math.isclose(float(half), float(full), rel_tol=1e-3)


def test_topk_kl_of_identical_distributions_is_zero_and_tail_is_stable():
    teacher = torch.zeros(2, 10)
    teacher[:, 0] = 25.0  # the other 9 tokens hold ~1e-10 of the mass: 1 - sum rounds to 0
    target = TopKTarget.from_logprobs(teacher.log_softmax(-1), 3, dtype=torch.float32)
    expect = math.log(7) + float(teacher.log_softmax(-1)[0, 5])
    torch.testing.assert_close(target.tail, torch.full((2,), expect), rtol=1e-5, atol=0)
    assert abs(float(topk_kl(target, teacher))) < 1e-7
    assert target.values.dtype == torch.float32 and target.index.dtype == torch.int32


def test_topk_kl_gradient_reaches_every_student_logit():
    teacher, student = _pair(3)
    log_p = teacher.log_softmax(-1)
    for k in (4, 40):  # a tail bucket, and none (k = V: its empty term must not give NaN)
        s = student.clone().requires_grad_(True)
        topk_kl(TopKTarget.from_logprobs(log_p, k, dtype=torch.float32), s).backward()
        assert torch.isfinite(s.grad).all() and (s.grad != 0).all()
    # At k = V the gradient is the full KL's.
    s_full = student.clone().requires_grad_(True)
    answer_kl(teacher, s_full).backward()
    torch.testing.assert_close(s.grad, s_full.grad, rtol=1e-5, atol=1e-8)


def test_topk_total_loss_and_errors():
    teacher, student = _pair(4)
    target = TopKTarget.from_logprobs(teacher.log_softmax(-1), 8)
    P = torch.softmax(torch.randn(4, 20), -1)
    loss, parts = total_loss(target, student, P, lambda_ent=0.5, lambda_col=2.0)
    torch.testing.assert_close(
        loss, topk_kl(target, student) + 0.5 * row_entropy(P) + 2 * collapse(P)
    )
    mask = torch.zeros(9, dtype=torch.bool)
    mask[[1, 4]] = True
    rows = TopKTarget(target.values[mask], target.index[mask], target.tail[mask])
    torch.testing.assert_close(topk_kl(target, student, mask), topk_kl(rows, student[mask]))
    with pytest.raises(ValueError, match=r"T = 9"):
        topk_kl(target, student[:5])
    with pytest.raises(ValueError, match=r"k=0"):
        TopKTarget.from_logprobs(teacher, 0)
    with pytest.raises(ValueError, match="no answer tokens"):
        topk_kl(target, student, torch.zeros(9, dtype=torch.bool))
