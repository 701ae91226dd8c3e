"""Training-only visual-token reduction: what makes a teacher robust to compressed inputs.

A real LVLM keeps most of its accuracy when it is handed fewer visual tokens; a tiny model
trained only on full token sets does not (its answers break once every text token moves). In
stage 3 each augmented dialogue gets its tokens reduced by one of the project's own
compressors (random drop, equidistant sample, 2-D / 1-D pooling, ToMe merging) at one of a few
rates, and packed by the family's adapter exactly as at inference (``inputs_with`` with P).
Every draw comes from a generator seeded by the training step, so a run is reproducible and a
resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mc_core import compressors

__all__ = ["Augmenter"]


class Augmenter:
    """Draws and applies a (method, rate) reduction per dialogue."""

    def __init__(
        self, methods: tuple[str, ...], rates: tuple[float, ...], fraction: float, dim: int
    ):
        self.fraction = fraction
        self.choices = [(m, r) for m in methods for r in rates]
        self._built = {c: compressors.build(c[0], rate=c[1], dim=dim) for c in self.choices}

    def draw(self, rng: np.random.Generator, rows: int) -> list[tuple[str, float] | None]:
        """Per row: a (method, rate), or None for a row left whole (about 1 - fraction)."""
        if not self.choices:
            return [None] * rows
        out: list[tuple[str, float] | None] = []
        for _ in range(rows):
            pick = self.choices[int(rng.integers(len(self.choices)))]
            out.append(pick if rng.random() < self.fraction else None)
        return out

    def apply(
        self, choice: tuple[str, float], tokens: Tensor, ctx, seed: int
    ) -> tuple[Tensor, Tensor]:
        """``(Y [m, d], P [m, n])`` of one image's ``tokens`` under ``choice``."""
        comp = self._built[choice]
        if hasattr(comp, "reseed"):  # random drop: a draw per step, not per process
            comp.reseed(seed)
        with torch.no_grad():
            return comp(tokens, ctx)
