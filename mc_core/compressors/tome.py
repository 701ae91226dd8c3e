"""ToMe: bipartite soft matching, repeated until m tokens remain, P tracked as a composition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor


@register("tome")
class ToMeCompressor(Compressor):
    """Size-weighted bipartite token merging (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461)."""

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        # Similarity on the vision keys when the adapter gives them (as ToMe does), else on the
        # tokens themselves.
        metric = context_tensor(ctx.keys if ctx.keys is not None else x, x)  # (n, k)
        dev = x.device
        msum = metric.clone()  # (cur, k) sum of each group's source metrics
        size = torch.ones(n, device=dev)  # (cur,) sources per group
        first = torch.arange(n, device=dev)  # (cur,) first source token of each group
        group = torch.arange(n, device=dev)  # (n,) current group of each source token
        while size.numel() > m:
            cur = size.numel()
            # A group's metric is the size-weighted mean of its sources.
            feat = F.normalize(msum / size[:, None], dim=-1)  # (cur, k)
            a_idx = torch.arange(0, cur, 2, device=dev)  # alternating bipartition
            b_idx = torch.arange(1, cur, 2, device=dev)
            r = min(cur - m, a_idx.numel())
            best, dst = (feat[a_idx] @ feat[b_idx].T).max(dim=1)  # best B partner per A token
            order = best.argsort(descending=True)
            src, keep_a = a_idx[order[:r]], a_idx[order[r:]]
            dst = dst[order[:r]]
            # New layout: unmerged A groups, then B groups (which absorb the merged A groups).
            n_keep = keep_a.numel()
            slot = torch.empty(cur, dtype=torch.long, device=dev)  # old group -> new group
            slot[keep_a] = torch.arange(n_keep, device=dev)
            slot[b_idx] = n_keep + torch.arange(b_idx.numel(), device=dev)
            slot[src] = n_keep + dst
            new = cur - r
            msum = msum.new_zeros(new, msum.shape[1]).index_add_(0, slot, msum)
            size = size.new_zeros(new).index_add_(0, slot, size)
            first = first.new_full((new,), n).scatter_reduce_(0, slot, first, reduce="amin")
            # Keep groups in image order (by their first source token) between rounds.
            resort = first.argsort()
            rank = torch.empty_like(resort)
            rank[resort] = torch.arange(new, device=dev)
            msum, size, first = msum[resort], size[resort], first[resort]
            group = rank[slot[group]]
        # Size-weighted merging: each source token weighs 1 / (its group's size).
        P = torch.zeros(m, n, dtype=torch.float32, device=dev)
        P[group, torch.arange(n, device=dev)] = 1.0 / size[group]
        return self._merge(x, P)
