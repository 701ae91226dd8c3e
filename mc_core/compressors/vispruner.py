"""VisPruner: important tokens by [CLS] attention, plus diverse tokens by removing duplicates.

Paper: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025, arXiv 2412.01818. Reference code: github.com/Theia-4869/VisPruner,
``LlavaMetaForCausalLM.encode_images`` in ``llava/model/llava_arch.py`` (commit aefa01a, the
LLaVA-1.5 path). The paper describes the two steps; the schedule below is the code's, which
we follow wherever the two could be read differently.

The budget m splits into ``int(m * important_ratio)`` important tokens, the top of the [CLS]
attention ranking, and the rest diverse ones. The diverse tokens come from the remaining tokens,
kept in descending-attention order, by rounds of duplicate removal: split the remainder
alternately into A (even positions) and B (odd positions), score each A token by its largest
cosine similarity to B, drop the ``min(8, surplus)`` highest-scoring A tokens, and continue with
[remaining A in descending-score order, then B], until exactly the diverse budget is left.

Paper vs code, and our adaptations:

- Budget split: a ratio of important tokens, varied in the experiments; the code's default
  ``--important_ratio`` is 0.5 (its README also runs 0.75 on MME). Our default is 0.5.
- Similarity features: the code compares the vision tower's feature-layer patch features
  (before the projector). We compare the tokens ``x`` we are given, the projector outputs of
  exactly those features (the authors' follow-up, CDPruner, measures token similarity on the
  projector outputs the same way). ``TokenContext.keys`` comes from the layer's input, not its
  output, so it is further from the code's features.
- [CLS] attention: ``TokenContext.cls_attention`` is the code's quantity (head-averaged
  [CLS] -> patch attention of the layer that outputs the feature layer).
- Small or odd remainders: the code sizes its gather of the surviving A tokens as
  ``R // 2 - r``, wrong when R is odd (A holds ceil(R / 2)) or r > |A|; it then raises or
  drops a token (never for LLaVA-1.5's 576 tokens and budgets 64/128/192). We keep every
  surviving A token and remove at most |A| per round, which is what the code does where it runs.
- Ties sort stably (the code's ``argsort`` is unstable); scores are computed in float64.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor

# Tokens removed per duplicate-removal round at most (the reference code's constant).
_ROUND = 8


@register("vispruner")
class VisPrunerCompressor(Compressor):
    """[CLS]-attention + duplicate-removal pruning (VisPruner, ICCV 2025, arXiv 2412.01818)."""

    needs = frozenset({"cls_attention"})

    def __init__(self, *, rate: float, dim: int, important_ratio: float = 0.5) -> None:
        super().__init__(rate=rate, dim=dim)
        ok = isinstance(important_ratio, numbers.Real) and not isinstance(important_ratio, bool)
        if not ok or not 0.0 <= float(important_ratio) <= 1.0:
            raise ValueError(
                f"vispruner important_ratio must be a number in [0, 1], got {important_ratio!r}"
            )
        self.important_ratio = float(important_ratio)

    def config(self) -> dict:
        return {"important_ratio": self.important_ratio}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, important_ratio={self.important_ratio}"

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        m = self.kept(x.shape[0])
        n_imp = int(m * self.important_ratio)
        n_div = m - n_imp
        attn = context_tensor(ctx.cls_attention, x)  # (n,)
        order = attn.argsort(descending=True, stable=True)  # (n,)
        important, rest = order[:n_imp], order[n_imp:]
        feats = F.normalize(x.detach().double(), dim=-1)  # (n, d)
        sim = feats @ feats.T if n_div > 0 else None  # (n, n) cosine, once for all rounds
        while n_div > 0:
            surplus = rest.numel() - n_div
            if surplus <= 0:
                break
            a, b = rest[0::2], rest[1::2]  # b is non-empty: rest holds >= n_div + 1 >= 2
            drop = min(_ROUND, surplus, a.numel())
            score = sim[a[:, None], b[None, :]].max(dim=1).values  # (|a|,) nearest-B similarity
            keep = score.argsort(descending=True, stable=True)[drop:]
            rest = torch.cat([a[keep], b])
        index = torch.cat([important, rest]) if n_div > 0 else important
        return self._select(x, index.sort().values)
