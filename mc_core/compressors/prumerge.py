"""PruMerge, fixed-budget variant: keep [CLS]-attention outliers, merge the rest into them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor

# Added to every attention weight so a kept token with (numerically) zero attention still
# carries its own row; far below the ~1/n attention of a real token for n up to ~1e6.
_EPS = 1e-8


@register("prumerge")
class PruMergeCompressor(Compressor):
    """[CLS]-attention selection + key-similarity merging (LLaVA-PruMerge, arXiv 2403.15388)."""

    needs = frozenset({"cls_attention", "keys"})

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        attn = context_tensor(ctx.cls_attention, x).clamp_min(0)  # (n,)
        # PruMerge keeps the IQR outliers (attn > Q3 + 1.5 IQR) and picks the budget
        # adaptively. With a fixed budget m, "outliers first, then the highest remaining" is
        # exactly the top-m of the attention ranking, since outliers are its top.
        keep = attn.topk(m).indices.sort().values  # (m,) in original order
        pruned_mask = torch.ones(n, dtype=torch.bool, device=x.device)
        pruned_mask[keep] = False
        pruned = pruned_mask.nonzero().squeeze(1)  # (n - m,)
        weight = attn + _EPS
        P = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        P[torch.arange(m, device=x.device), keep] = weight[keep]
        if pruned.numel():
            keys = F.normalize(context_tensor(ctx.keys, x), dim=-1)  # (n, k)
            owner = (keys[pruned] @ keys[keep].T).argmax(dim=1)  # (n - m,) row of each
            # Each pruned column gets exactly one entry, in the row of its most similar kept
            # token, weighted by its own [CLS] attention.
            P[owner, pruned] = weight[pruned]
        return self._merge(x, P / P.sum(dim=1, keepdim=True))
