"""ToMe: bipartite soft matching, repeated until m tokens remain, P tracked as a composition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors.base import Compressor, TokenContext, context_tensor


class ToMeCompressor(Compressor):
    """Size-weighted bipartite token merging (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461)."""

    name = "tome"

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        # Similarity on the vision keys when the adapter gives them (as ToMe does), else on the
        # tokens themselves.
        metric = context_tensor(ctx.keys if ctx.keys is not None else x, x)  # (n, k)
        counts = torch.eye(n, dtype=torch.float32, device=x.device)  # (cur, n) source counts
        first = torch.arange(n, device=x.device)  # (cur,) first source token of each group
        while counts.shape[0] > m:
            cur = counts.shape[0]
            size = counts.sum(dim=1, keepdim=True)
            # A merged token's metric is the size-weighted mean of its sources.
            feat = F.normalize((counts / size) @ metric, dim=-1)  # (cur, k)
            a, b = feat[0::2], feat[1::2]  # alternating bipartition
            r = min(cur - m, a.shape[0])
            best, dst = (a @ b.T).max(dim=1)  # (|A|,) most similar B token of each A token
            order = best.argsort(descending=True)
            src, keep_a = order[:r], order[r:]
            counts_b = counts[1::2].index_add(0, dst[src], counts[0::2][src])
            first_b = first[1::2].scatter_reduce(0, dst[src], first[0::2][src], reduce="amin")
            counts = torch.cat([counts[0::2][keep_a], counts_b])
            first = torch.cat([first[0::2][keep_a], first_b])
            # Keep groups in image order (by their first source token) between rounds.
            resort = first.argsort()
            counts, first = counts[resort], first[resort]
        return self._merge(x, counts / counts.sum(dim=1, keepdim=True))
