"""Losses on hand-made P and logits, where the right answer is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from mc_core.losses import align_from_end, answer_kl, collapse, row_entropy, total_loss


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
