"""CDPruner: keep the subset of maximal conditional diversity (a DPP conditioned on the prompt).

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967. Reference code:
github.com/Theia-4869/CDPruner, ``LlavaMetaForCausalLM.encode_images`` in
``llava/model/llava_arch.py`` (commit 9541616, the LLaVA-1.5 path). We follow the code:

- similarity ``S = f f^T`` with ``f`` the L2-normalised visual tokens (projector outputs);
- relevance of token i to the instruction: its cosine similarity to each prompt embedding,
  averaged over the prompt's t embeddings, then min-max normalised over the image's tokens as
  ``(r - min + 1e-6) / (max - min)``;
- kernel ``L = diag(r) S diag(r)``;
- greedy MAP inference of the DPP with the incremental Cholesky update of Chen et al.
  (NeurIPS 2018): pick ``argmax d_j^2``, ``e = (L[j] - c[:, j]^T c) / d_j``, ``d^2 -= e^2``.

Paper vs code, and our adaptations:

- Relevance space: the code compares CLIP's projected patch embeddings with CLIP text-tower
  embeddings, one pooled embedding per 77-token chunk of the instruction (usually one), and
  averages over the chunks. We compare the visual tokens ``x`` with
  ``TokenContext.prompt_embeddings``, the prompt tokens' LLM input embeddings, and average the
  cosine over the t tokens (for Qwen2.5-VL, which has no CLIP text tower, the maintainers also
  take the visual side after the merger, in the LLM's space: issue #7).
- Sign: the code negates the CLIP cosine before averaging; the paper does not describe it, and
  the maintainers call it a phenomenon observed only with CLIP (issues #9, #14, #19). It belongs
  to CLIP's space, not ours, so by default we do not negate; ``negate_relevance=True`` gives the
  code's sign.
- ``theta``: the code leaves an optional re-weighting ``r <- exp(theta / (2 (1 - theta)) r)``
  commented out (Chen et al.'s relevance/diversity trade-off). Off by default, as in the code;
  ``theta`` in (0, 1) turns it on.
- Stop rule: the code always takes m greedy steps, so past the kernel's rank (m > d, or
  duplicate tokens) it divides by the root of a ~0 or negative gain (inf/NaN). We use Chen et al.'s
  epsilon (1e-10, relative to the largest kernel diagonal): when no remaining gain exceeds it,
  the greedy restarts on the unchosen tokens, and tokens whose own diagonal is below it come
  last, by relevance. While every gain taken exceeds epsilon, this is the code's choice exactly.
- Degenerate relevance (all tokens equally relevant, n = 1, or an empty prompt): the code
  divides by zero; we use uniform relevance, i.e. a plain similarity DPP.
- The code min-max normalises over the batch (one image in its evaluation); we do it per image.
  Everything is computed in float64 (the code: float32).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext

# Chen et al.'s stop threshold on the marginal gain d_j^2 (relative to the largest L_jj here).
_EPS = 1e-10
# Floor the code adds in the min-max normalisation of the relevance.
_FLOOR = 1e-6


def _greedy_map(kernel: Tensor, m: int) -> Tensor:
    """m indices chosen by greedy DPP MAP on a PSD ``kernel`` [n, n] (float64), in pick order."""
    n = kernel.shape[0]
    diag = kernel.diagonal().clone()
    tol = _EPS * float(diag.max().clamp_min(0))
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picks: list[Tensor] = []
    cis = kernel.new_zeros(m, n)  # rows of the incremental Cholesky factor, this round
    gain = diag.clone()  # d_j^2: gain of adding j to this round's chosen set
    rows = 0
    while len(picks) < m:
        j = gain.argmax()
        if not gain[j] > tol:  # the span of this round's picks holds every remaining token
            if rows == 0:  # a fresh round found nothing: the rest by relevance (L_jj)
                rest = (~chosen).nonzero().squeeze(1)
                order = diag[rest].argsort(descending=True, stable=True)
                picks.extend(rest[order[: m - len(picks)]])
                break
            gain = diag.masked_fill(chosen, float("-inf"))
            rows = 0
            continue
        e = (kernel[j] - cis[:rows, j] @ cis[:rows]) / gain[j].sqrt()
        cis[rows] = e
        rows += 1
        gain = gain - e.square()
        gain[j] = float("-inf")
        chosen[j] = True
        picks.append(j)
    return torch.stack(picks)


@register("cdpruner")
class CDPrunerCompressor(Compressor):
    """Prompt-conditioned DPP pruning (CDPruner, Zhang et al., NeurIPS 2025, arXiv 2506.10967)."""

    needs = frozenset({"prompt_embeddings"})
    prompt_dependent = True

    def __init__(
        self,
        *,
        rate: float,
        dim: int,
        theta: float | None = None,
        negate_relevance: bool = False,
    ) -> None:
        super().__init__(rate=rate, dim=dim)
        if theta is not None:
            ok = isinstance(theta, numbers.Real) and not isinstance(theta, bool)
            if not ok or not 0.0 < float(theta) < 1.0:
                raise ValueError(f"cdpruner theta must be None or in (0, 1), got {theta!r}")
            theta = float(theta)
        if not isinstance(negate_relevance, bool):
            raise ValueError(f"cdpruner negate_relevance must be a bool, got {negate_relevance!r}")
        self.theta = theta
        self.negate_relevance = negate_relevance

    def config(self) -> dict:
        return {"theta": self.theta, "negate_relevance": self.negate_relevance}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, theta={self.theta}, negate_relevance={self.negate_relevance}"
        )

    def relevance(self, x: Tensor, prompt: Tensor) -> Tensor:
        """Per-token relevance [n] (float64) to the prompt embeddings [t, d], as in the kernel."""
        feats = F.normalize(x.detach().double(), dim=-1)  # (n, d)
        text = F.normalize(prompt.detach().to(device=x.device, dtype=torch.float64), dim=-1)
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        rel = ones
        if text.shape[0]:
            cos = (feats @ text.T).mean(dim=1)  # (n,) mean over the prompt's tokens
            cos = -cos if self.negate_relevance else cos
            span = cos.max() - cos.min()
            if span > 0:
                rel = (cos - cos.min() + _FLOOR) / span
        if self.theta is not None:
            rel = torch.exp(self.theta / (2.0 * (1.0 - self.theta)) * rel)
        return rel

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        prompt = ctx.prompt_embeddings
        if prompt.shape[1] != x.shape[1]:
            raise ValueError(
                f"cdpruner: TokenContext.prompt_embeddings have width {prompt.shape[1]}, the "
                f"visual tokens {x.shape[1]} (both must be in the LLM's embedding space)"
            )
        feats = F.normalize(x.detach().double(), dim=-1)  # (n, d)
        rel = self.relevance(x, prompt)  # (n,)
        kernel = rel[:, None] * (feats @ feats.T) * rel[None, :]  # (n, n)
        index = _greedy_map(kernel, self.kept(x.shape[0]))
        return self._select(x, index.sort().values)
