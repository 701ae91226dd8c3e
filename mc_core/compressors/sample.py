"""Equidistant sampling: indices round(linspace(0, n - 1, m))."""

from __future__ import annotations

import torch
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext


@register("sample")
class SampleCompressor(Compressor):
    """Equidistant token sampling (the Sample baseline of MetaCompress, arXiv 2603.21701)."""

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        # Spacing (n-1)/(m-1) >= 1, so the rounded indices are distinct and increasing.
        index = torch.linspace(0, n - 1, self.kept(n), dtype=torch.float64).round().long()
        return self._select(x, index)
