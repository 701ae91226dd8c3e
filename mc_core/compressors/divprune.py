"""DivPrune: keep a maximally diverse subset (greedy max-min cosine distance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext


@register("divprune")
class DivPruneCompressor(Compressor):
    """Max-min diversity pruning (DivPrune, Alvar et al., CVPR 2025, arXiv 2503.02175)."""

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        f = F.normalize(x.detach().float(), dim=-1)  # (n, d)
        dist = 1.0 - f @ f.T  # (n, n) cosine distance
        # Start from the most isolated token (largest distance to its nearest neighbour),
        # then repeatedly add the token farthest from everything chosen so far.
        off = dist + torch.diag(torch.full((n,), float("inf"), device=x.device))
        first = off.min(dim=1).values.argmax()  # n = 1: the lone token (its row is all inf)
        chosen = [first]
        min_dist = dist[first].clone()  # (n,) distance to the chosen set
        min_dist[first] = float("-inf")
        for _ in range(m - 1):
            j = min_dist.argmax()
            chosen.append(j)
            min_dist = torch.minimum(min_dist, dist[j])
            min_dist[j] = float("-inf")
        index = torch.stack(chosen).sort().values
        return self._select(x, index)
