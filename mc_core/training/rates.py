"""Training one compressor over many rates (``TrainConfig.rates``): each step's rate.

``rates`` is ``[lo, hi]`` (a range: each step draws a rate uniformly in it) or three or more
rates (a set: each step draws one member). The draw is a pure function of ``(seed, step)``,
from its own generator, so a resumed run draws the same rates as an uninterrupted one and the
single-rate path (``rates = None``) draws nothing at all: its random streams are untouched.

The whole batch of a step shares the step's rate. That costs nothing in what is learnt: the
loss already averages per answer token and per image, so a step at one rate is an unbiased
sample of the loss averaged over rates, and over a run every rate is seen about equally often
(600 steps draw each third of a range ~200 times). It also keeps the step's shapes regular
(every image of the batch keeps ``m(rate)`` tokens), so micro-batching plans for one ``m``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from mc_core.compressors.ops import check_rates, kept_tokens

__all__ = ["check_rates", "costliest_kept", "nominal_rate", "step_rate"]

# Mixed into the step's seed so that the rate stream is not the batch order's (`loop._order`).
_SALT = 27


def step_rate(rates: Sequence[float], seed: int, step: int) -> float:
    """The rate of optimiser step ``step`` (0-based) of a run seeded ``seed``.

    A range ``[lo, hi]`` draws uniformly in it; a set draws one of its members, each with
    the same probability. Pure in ``(rates, seed, step)``.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step={step!r}: expected an int >= 0")
    # SeedSequence mixes the three words, so neighbouring steps and seeds draw independently
    # (a negative seed is valid in TrainConfig: fold it into the unsigned word it needs).
    rng = np.random.default_rng([int(seed) % 2**63, int(step), _SALT])
    if len(rates) == 2:
        lo, hi = rates
        return float(lo + (hi - lo) * rng.random())
    return float(rates[int(rng.integers(len(rates)))])


def nominal_rate(rates: Sequence[float]) -> float:
    """The rate an any-rate compressor is built, saved and loaded at, used when a call gives
    none: a range's midpoint, a set's median member (the lower middle one for an even count),
    so it is a rate the weights were trained at or between."""
    if len(rates) == 2:
        return (rates[0] + rates[1]) / 2
    ordered = sorted(rates)
    return ordered[(len(ordered) - 1) // 2]


def costliest_kept(rates: Sequence[float]):
    """``kept(n)`` at the lowest rate (the most tokens kept): the step the memory plan of
    ``micro_batch: auto`` must fit, whichever rate a step draws."""
    low = min(rates)
    return lambda n: kept_tokens(n, low, where="train.rates")
