"""Statistics of evaluation results: bootstrap intervals, separation, mean and spread over seeds.

A cell's accuracy is a mean over dialogues, and dialogues (not turns) are the independent unit:
the three turns of one dialogue share an image. So intervals resample whole dialogues.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "bootstrap_ci",
    "mean_sd",
    "paired_difference",
    "paired_seed_difference",
    "separated",
]

RESAMPLES = 2000  # percentile bootstrap: ~2k resamples put the 2.5% quantile within ~0.003


def _check_settings(where: str, level: float, resamples: int) -> None:
    """The bootstrap's settings, refused by name before any resampling."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"{where} level={level!r}: expected a number in (0, 1)")
    if resamples < 1:
        raise ValueError(f"{where} resamples={resamples!r}: expected >= 1")


def bootstrap_ci(
    values: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[float]:
    """Percentile bootstrap interval ``[lo, hi]`` of the mean of ``values``.

    Args:
        values: one score per independent unit (a dialogue's mean accuracy over its turns).
        level: coverage in (0, 1).
        resamples: bootstrap resamples.
        seed: RNG seed (the interval is a pure function of values, level, resamples, seed).

    Raises:
        ValueError: no values, a non-finite value, or a bad level / resample count.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of scores, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_ci: scores contain NaN or inf")
    _check_settings("bootstrap_ci", level, resamples)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """Mean of ``a - b`` over the same dialogues, with its paired bootstrap interval.

    Two methods scored on the same dialogues share each dialogue's difficulty, so resampling
    the per-dialogue differences answers "is A better than B" directly; `separated` (the two
    marginal intervals disjoint) needs about twice the difference to say yes.

    Returns:
        ``{"diff": mean(a - b), "ci": [lo, hi], "n": len(a)}``.

    Raises:
        ValueError: the lists differ in length (not the same dialogues), or as `bootstrap_ci`.
    """
    x, y = list(a), list(b)
    if len(x) != len(y):
        raise ValueError(
            f"paired_difference needs scores of the same dialogues: got {len(x)} and {len(y)}"
        )
    d = [float(u) - float(v) for u, v in zip(x, y, strict=True)]
    ci = bootstrap_ci(d, level=level, resamples=resamples, seed=seed)  # raises when empty
    return {"diff": sum(d) / len(d), "ci": ci, "n": len(d)}


def paired_seed_difference(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """Difference of two methods' seed means over the same dialogues, with an interval that
    covers both the dialogues and the training seeds.

    ``a`` and ``b`` hold one list of per-dialogue scores per trained seed (every list over the
    same dialogues in the same order). A compressor retrained with another seed scores
    differently on the same dialogues, so a paired interval of one seed against one seed
    (`paired_difference`) says nothing about which *method* is better: here every resample
    draws each side's seeds and the dialogues with replacement (a two-level bootstrap; the
    dialogues are drawn once, for both sides, which keeps the pairing). With one seed a side
    contributes no seed spread, and with one seed on both sides this is `paired_difference`.
    With few seeds the seed level is coarse (two or three draws), so the interval is an
    approximation that widens as seeds disagree.

    Returns:
        ``{"diff": mean(a) - mean(b), "ci": [lo, hi], "n": dialogues, "seeds": [len(a),
        len(b)]}``.

    Raises:
        ValueError: no seeds, lists of different lengths, or non-finite scores.
    """
    x = [np.asarray(list(v), dtype=np.float64) for v in a]
    y = [np.asarray(list(v), dtype=np.float64) for v in b]
    if not x or not y:
        raise ValueError("paired_seed_difference needs at least one seed on each side")
    if len(x) == len(y) == 1:
        out = paired_difference(x[0], y[0], level=level, resamples=resamples, seed=seed)
        return {**out, "seeds": [1, 1]}
    sizes = {v.size for v in x + y}
    if len(sizes) != 1:
        raise ValueError(
            f"paired_seed_difference needs scores of the same dialogues: got {sorted(sizes)}"
        )
    xa, ya = np.stack(x), np.stack(y)  # (seeds, dialogues)
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise ValueError("paired_seed_difference: scores contain NaN or inf")
    _check_settings("paired_seed_difference", level, resamples)
    n = xa.shape[1]
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        d = xa[rng.integers(0, len(xa), len(xa))].mean(axis=0)
        d = d - ya[rng.integers(0, len(ya), len(ya))].mean(axis=0)  # (dialogues,)
        stats[r] = d[rng.integers(0, n, n)].mean()
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    diff = float(xa.mean() - ya.mean())
    return {"diff": diff, "ci": [float(lo), float(hi)], "n": n, "seeds": [len(xa), len(ya)]}


def separated(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when interval ``a`` lies entirely above interval ``b`` (a win that is not noise)."""
    return float(a[0]) > float(b[1])


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of per-seed results."""
    x = [float(v) for v in values]
    if not x or not all(math.isfinite(v) for v in x):
        raise ValueError(f"mean_sd needs finite values, got {x!r}")
    mean = sum(x) / len(x)
    if len(x) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
