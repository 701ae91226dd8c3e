"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor


@register("visionzip")
class VisionZipCompressor(Compressor):
    """Dominant + contextual tokens (VisionZip, Yang et al., CVPR 2025, arXiv 2412.04467)."""

    needs = frozenset({"cls_attention", "keys"})

    def __init__(self, *, rate: float, dim: int, dominant_ratio: float = 54 / 64) -> None:
        super().__init__(rate=rate, dim=dim)
        if isinstance(dominant_ratio, bool) or not 0.0 < float(dominant_ratio) <= 1.0:
            raise ValueError(f"visionzip dominant_ratio must be in (0, 1], got {dominant_ratio!r}")
        # The paper's LLaVA-1.5 setting keeps 54 dominant + 10 contextual of 64 tokens.
        self.dominant_ratio = float(dominant_ratio)

    def config(self) -> dict:
        return {"dominant_ratio": self.dominant_ratio}

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        n_dom = min(m, max(1, round(m * self.dominant_ratio)))
        n_ctx = m - n_dom
        attn = context_tensor(ctx.cls_attention, x)  # (n,)
        dominant = attn.topk(n_dom).indices
        rest_mask = torch.ones(n, dtype=torch.bool, device=x.device)
        rest_mask[dominant] = False
        rest = rest_mask.nonzero().squeeze(1)  # (n - n_dom,) ascending
        anchors = [dominant]
        rows = [F.one_hot(dominant, n).float()]  # (n_dom, n)
        if n_ctx > 0:
            # Contextual targets evenly spaced over the remaining tokens; every other remaining
            # token joins its most key-similar target, and each group is averaged uniformly.
            pick = torch.linspace(0, rest.numel() - 1, n_ctx, dtype=torch.float64, device=x.device)
            target_mask = torch.zeros(rest.numel(), dtype=torch.bool, device=x.device)
            target_mask[pick.round().long()] = True
            targets, others = rest[target_mask], rest[~target_mask]
            groups = torch.zeros(n_ctx, n, dtype=torch.float32, device=x.device)
            groups[torch.arange(n_ctx, device=x.device), targets] = 1.0
            if others.numel():
                keys = F.normalize(context_tensor(ctx.keys, x), dim=-1)  # (n, k)
                owner = (keys[others] @ keys[targets].T).argmax(dim=1)
                groups[owner, others] = 1.0
            anchors.append(targets)
            rows.append(groups / groups.sum(dim=1, keepdim=True))
        # Rows ordered by their anchor token so the compressed sequence keeps the image order.
        order = torch.cat(anchors).argsort()
        return self._merge(x, torch.cat(rows)[order])
