"""Bootstrap intervals, separation and mean +- sd: properties that could fail."""

from __future__ import annotations

import math

import pytest

from mc_core.evaluation.stats import bootstrap_ci, mean_sd, paired_difference, separated


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
