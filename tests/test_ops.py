"""P algebra: rates, kept counts, selection and pooling matrices, apply, validate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mc_core.compressors.ops import (
    apply,
    check_rate,
    kept_tokens,
    pool_layout,
    pool_matrix,
    selection_matrix,
    validate,
)


@pytest.mark.parametrize(
    "rate", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), "0.5x", None, True]
)
def test_check_rate_rejects_and_names(rate):
    with pytest.raises(ValueError, match="train.rate"):
        check_rate(rate, where="train.rate")


def test_check_rate_accepts_open_interval():
    assert check_rate(0.9) == 0.9
    assert check_rate(1e-9) == 1e-9


@pytest.mark.parametrize(
    ("n", "rate", "m"),
    [
        (576, 0.9, 58),
        (1000, 0.9, 100),
        (37, 0.5, 19),
        (577, 0.5, 289),
        (10, 0.9, 1),
        (1, 0.99, 1),
        (4, 0.75, 1),
        (2880, 0.9, 288),
    ],
)
def test_kept_tokens_is_ceil(n, rate, m):
    # 1000 * (1 - 0.9) is 99.99999999999997 in floats: the count must still be exactly 100.
    assert kept_tokens(n, rate) == m


def test_kept_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="eval.rate"):
        kept_tokens(10, float("nan"), where="eval.rate")
    with pytest.raises(ValueError, match="positive int"):
        kept_tokens(0, 0.5)


def test_selection_matrix_and_apply():
    x = torch.arange(12.0).reshape(6, 2)
    P = selection_matrix(torch.tensor([1, 4]), 6)
    validate(P, 6, 2)
    assert torch.equal(apply(P, x), x[[1, 4]])
    with pytest.raises(ValueError, match="out of range"):
        selection_matrix(torch.tensor([6]), 6)


def test_apply_keeps_dtype_and_checks_shapes():
    x = torch.randn(5, 3, dtype=torch.bfloat16)
    assert apply(torch.full((2, 5), 0.2), x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="apply needs"):
        apply(torch.ones(2, 4), x)


def test_validate_catches_each_violation():
    good = torch.full((2, 4), 0.25)
    validate(good, 4, 2)
    with pytest.raises(ValueError, match="columns"):
        validate(good, 5)
    with pytest.raises(ValueError, match="rows"):
        validate(good, 4, 3)
    with pytest.raises(ValueError, match="negative"):
        validate(torch.tensor([[1.5, -0.5]]), 2)
    with pytest.raises(ValueError, match="sums to"):
        validate(torch.tensor([[0.5, 0.4]]), 2)
    with pytest.raises(ValueError, match="non-finite"):
        validate(torch.tensor([[float("nan"), 1.0]]), 2)


@pytest.mark.parametrize(("n", "m"), [(37, 19), (576, 58), (577, 289), (1000, 100), (5, 5), (7, 1)])
def test_pool_1d_rows_convex_and_mass_uniform(n, m):
    P = pool_matrix(n, m)
    validate(P, n, m, atol=1e-5)  # weights are integers / n: float32 rounding only
    # Every token carries the same total weight m/n: pooling favours no input token.
    torch.testing.assert_close(P.sum(0), torch.full((n,), m / n), atol=1e-5, rtol=0)
    # Each window is contiguous: at most ceil(n/m) + 1 tokens touched.
    assert int((P > 0).sum(1).max()) <= math.ceil(n / m) + 1


@pytest.mark.parametrize(("h", "w", "oh", "ow"), [(24, 24, 12, 12), (24, 24, 8, 8), (6, 8, 3, 4)])
def test_pool_2d_equals_adaptive_avg_pool_when_divisible(h, w, oh, ow):
    x = torch.randn(h * w, 5)
    P = pool_matrix(h * w, oh * ow, (h, w))
    assert pool_layout(h, w, oh * ow) == [ow] * oh
    ref = F.adaptive_avg_pool2d(x.T.reshape(1, 5, h, w), (oh, ow)).reshape(5, -1).T
    # float32 sums of a few numbers: 1e-5 absolute covers the rounding.
    torch.testing.assert_close(apply(P, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("h", "w", "m"), [(24, 24, 58), (24, 24, 29), (5, 9, 7), (1, 10, 3)])
def test_pool_2d_any_m(h, w, m):
    P = pool_matrix(h * w, m, (h, w))
    validate(P, h * w, m, atol=1e-5)
    counts = pool_layout(h, w, m)
    assert sum(counts) == m and max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="grid"):
        pool_matrix(h * w + 1, m, (h, w))


@pytest.mark.parametrize(
    ("h", "w", "m"), [(8, 8, 7), (8, 8, 13), (16, 16, 29), (16, 16, 31), (5, 9, 7), (24, 24, 23)]
)
def test_pool_layout_prime_m_is_two_dimensional(h, w, m):
    # A prime m used to get one band of m full-height strips (8 x 8 -> 7: [7]), leaving the
    # generator's queries no vertical prior; it must get uneven bands close to square cells.
    counts = pool_layout(h, w, m)
    assert sum(counts) == m and max(counts) - min(counts) <= 1
    assert 2 <= len(counts) <= h
    ideal = math.sqrt(m * h / w)
    assert abs(len(counts) - ideal) <= 0.5  # round(ideal) bands: the aspect-matched count
    P = pool_matrix(h * w, m, (h, w))
    validate(P, h * w, m, atol=1e-5)
    rows_touched = (P.reshape(m, h, w) > 0).any(dim=2).sum(dim=1)  # token rows per output
    assert int(rows_touched.max()) < h  # no output averages a full-height strip


def test_pool_layout_regular_when_a_divisor_fits():
    # Divisible cases keep their regular grid (the generator layouts already trained).
    assert pool_layout(8, 8, 16) == [4] * 4
    assert pool_layout(8, 8, 32) == [8] * 4
    assert pool_layout(16, 16, 64) == [8] * 8
    assert pool_layout(8, 8, 7) == [2, 2, 3]
