"""Average pooling with fractional windows (2-D over the grid when known, else 1-D)."""

from __future__ import annotations

from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext
from mc_core.compressors.ops import pool_matrix


@register("pool")
class PoolCompressor(Compressor):
    """Fractional average pooling (the pooling baseline/prior of MetaCompress, arXiv 2603.21701)."""

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        return self._merge(x, pool_matrix(n, self.kept(n), ctx.grid, device=x.device))
