"""Random pruning: m uniformly drawn tokens, kept in their original order."""

from __future__ import annotations

import torch
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext


@register("random")
class RandomCompressor(Compressor):
    """Uniform random token pruning (the Random baseline of MetaCompress, arXiv 2603.21701)."""

    def __init__(self, *, rate: float, dim: int, seed: int = 0) -> None:
        super().__init__(rate=rate, dim=dim)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"random seed must be an int, got {seed!r}")
        self.seed = seed
        self.reseed(seed)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the draw sequence (from ``seed``, or from the configured seed)."""
        # A private CPU generator: the draws do not depend on the global RNG or the device.
        self._gen = torch.Generator().manual_seed(self.seed if seed is None else seed)

    def config(self) -> dict:
        return {"seed": self.seed}

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        index = torch.randperm(n, generator=self._gen)[: self.kept(n)].sort().values
        return self._select(x, index)
