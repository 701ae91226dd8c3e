"""FastV: keep the tokens the first turn's prompt attends to most at LLM layer K.

K (`mc_core.inference.compress.compress_inputs`' `fastv_layer`, default 2) names the layer whose
attention ranks the tokens; as for every method here, the kept tokens replace the image at the
LLM's input. FastV's own code keeps all tokens up to layer K - 1, ranks by that layer's
attention and drops the rest from layer K on, so its K = 2 reads the attention our K = 1 reads.
"""

from __future__ import annotations

from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext, context_tensor


@register("fastv")
class FastVCompressor(Compressor):
    """Prompt-attention pruning (FastV, Chen et al., ECCV 2024, arXiv 2403.06764)."""

    needs = frozenset({"prompt_attention"})
    prompt_dependent = True

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        scores = context_tensor(ctx.prompt_attention, x)  # (n,)
        # Kept tokens stay in their original order so the LLM sees the same layout.
        index = scores.topk(self.kept(x.shape[0])).indices.sort().values
        return self._select(x, index)
