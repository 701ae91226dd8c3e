"""Identity reference: all n tokens, P = I."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext


@register("none")
class NoneCompressor(Compressor):
    """Uncompressed reference (the "no reduction" row of MetaCompress, arXiv 2603.21701)."""

    @classmethod
    def _check_rate(cls, rate: float, where: str = "rate") -> float:
        # The grid hands every method the cell's rate; `none` ignores it but still rejects
        # values that are not a rate at all, so a typo in params is caught here too.
        ok = not isinstance(rate, bool) and isinstance(rate, (int, float))
        if not ok or math.isnan(rate) or not 0.0 <= rate < 1.0:
            raise ValueError(f"none {where} must be in [0, 1) (it is ignored), got {rate!r}")
        return float(rate)

    def __init__(self, *, rate: float = 0.0, dim: int) -> None:
        super().__init__(rate=rate, dim=dim)

    def kept(self, n: int) -> int:
        return n

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        return x, torch.eye(x.shape[0], dtype=torch.float32, device=x.device)
