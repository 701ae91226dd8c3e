"""Bootstrap intervals, separation and mean +- sd: properties that could fail."""

from __future__ import annotations

import math

import pytest

from mc_core.evaluation.stats import (
    bootstrap_ci,
    mean_sd,
    paired_difference,
    paired_seed_difference,
    separated,
)


def test_bootstrap_ci_covers_mean_and_is_seeded():
    scores = [1.0] * 60 + [0.0] * 40  # mean 0.6
    lo, hi = bootstrap_ci(scores, seed=3)
    assert lo < 0.6 < hi
    # Normal approximation: half-width 1.96 * sqrt(0.24 / 100) = 0.096; the percentile bootstrap
    # lands within 0.02 of it at 2000 resamples.
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.24 / 100), abs=0.02)
    assert bootstrap_ci(scores, seed=3) == [lo, hi]  # a pure function of its seed
    assert bootstrap_ci(scores, seed=4) != [lo, hi]


def test_bootstrap_ci_narrows_with_more_dialogues():
    small = bootstrap_ci([1.0, 0.0] * 48)  # 96 dialogues
    large = bootstrap_ci([1.0, 0.0] * 150)  # 300 dialogues
    assert (large[1] - large[0]) < (small[1] - small[0]) * 0.7  # ~ sqrt(96 / 300) = 0.57


def test_constant_scores_give_a_point_interval():
    assert bootstrap_ci([0.5] * 10) == [0.5, 0.5]


@pytest.mark.parametrize("bad", [[], [float("nan")], [[1.0, 0.0]]])
def test_bootstrap_ci_rejects_bad_scores(bad):
    with pytest.raises(ValueError, match="bootstrap_ci"):
        bootstrap_ci(bad)


def test_separated_needs_disjoint_intervals():
    assert separated([0.6, 0.7], [0.4, 0.55])
    assert not separated([0.6, 0.7], [0.4, 0.65])  # overlap: no win
    assert not separated([0.4, 0.55], [0.6, 0.7])


def test_mean_sd():
    assert mean_sd([0.5]) == (0.5, 0.0)
    mean, sd = mean_sd([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5) and sd == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mean_sd([])


def test_paired_difference_sees_what_separate_intervals_miss():
    # Two methods on the same 300 dialogues: B fails where A fails, and on 15 more. The
    # marginal intervals (0.80 vs 0.75, each +-0.045) overlap; the shared failures cancel in
    # the per-dialogue differences, so the paired interval excludes 0.
    a = [1.0] * 240 + [0.0] * 60
    b = [1.0] * 225 + [0.0] * 75
    assert not separated(bootstrap_ci(a), bootstrap_ci(b))
    pd = paired_difference(a, b)
    assert pd["n"] == 300 and pd["diff"] == pytest.approx(0.05)
    assert 0.0 < pd["ci"][0] < 0.05 < pd["ci"][1]
    # The same scores in unrelated order: the pairing is what narrows it.
    shuffled = b[150:] + b[:150]
    wide = paired_difference(a, shuffled)
    assert wide["diff"] == pytest.approx(0.05) and wide["ci"][0] < 0.0


def test_paired_difference_of_a_method_with_itself_is_zero():
    a = [1.0, 0.0, 0.5] * 20
    assert paired_difference(a, a) == {"diff": 0.0, "ci": [0.0, 0.0], "n": 60}


def test_paired_difference_needs_the_same_dialogues():
    with pytest.raises(ValueError, match="same dialogues: got 3 and 2"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0])


def _scores(n: int, wrong: set[int]) -> list[float]:
    return [0.0 if i in wrong else 1.0 for i in range(n)]


def test_paired_seed_difference_covers_the_spread_between_seeds():
    n = 300
    # Three seeds of A that disagree (fail 0, 30 or 60 of the 300 dialogues) against three
    # seeds of B that agree (fail the same 30): the seed means are equal (diff 0).
    a = [_scores(n, set(range(k))) for k in (0, 30, 60)]
    b = [_scores(n, set(range(30)))] * 3
    got = paired_seed_difference(a, b)
    assert got["diff"] == pytest.approx(0.0) and got["seeds"] == [3, 3] and got["n"] == n
    # Pairing the per-dialogue seed means alone sees only the dialogues (the 30 dialogues
    # A's seeds split on): an interval narrower than the one that also draws the seeds.
    mean_a = [sum(col) / 3 for col in zip(*a, strict=True)]
    dialogues_only = paired_difference(mean_a, b[0])
    width = got["ci"][1] - got["ci"][0]
    assert width > 1.5 * (dialogues_only["ci"][1] - dialogues_only["ci"][0])
    assert got["ci"][0] < -0.05 < 0.05 < got["ci"][1]  # a seed of A alone is 0.1 off either way
    # Seeds that all agree: nothing to add, the interval is the dialogues' one.
    same = paired_seed_difference([a[1]] * 3, b)
    assert same["ci"] == [0.0, 0.0]


def test_paired_seed_difference_of_one_seed_each_is_the_paired_difference():
    a, b = _scores(50, {1, 2, 3}), _scores(50, {4})
    got = paired_seed_difference([a], [b], seed=3)
    assert got == {**paired_difference(a, b, seed=3), "seeds": [1, 1]}


def test_paired_seed_difference_needs_the_same_dialogues():
    with pytest.raises(ValueError, match="same dialogues: got \\[9, 10\\]"):
        paired_seed_difference([[1.0] * 10, [1.0] * 9], [[1.0] * 10])
    with pytest.raises(ValueError, match="at least one seed"):
        paired_seed_difference([], [[1.0]])
