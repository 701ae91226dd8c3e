"""Bootstrap intervals, separation and mean +- sd: properties that could fail."""

from __future__ import annotations

import math

import pytest

from mc_core.stats import bootstrap_ci, mean_sd, separated


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
