"""The compressor contract shared by every method: tokens [n, d] -> (P @ tokens, P [m, n])."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from mc_core.compressors.ops import apply, check_rate, kept_tokens, selection_matrix

CONTEXT_FIELDS = frozenset({"cls_attention", "keys", "prompt_attention", "prompt_embeddings"})
# Fields that depend on the first turn's prompt, not on the image: an adapter's `contexts`
# leaves them empty and `mc_core.inference.compress.compress_inputs` fills them.
PROMPT_FIELDS = frozenset({"prompt_attention", "prompt_embeddings"})


@dataclass
class TokenContext:
    """What an adapter knows about one image's visual tokens; every field is optional.

    Attributes:
        positions: [n, 2] float (row, col) in [0, 1] of each token on the image.
        grid: (h, w) when the tokens are exactly a row-major h x w grid.
        cls_attention: [n] vision [CLS] -> patch attention (head-averaged, feature layer).
        keys: [n, k] vision-tower keys at the feature layer (merge similarity).
        prompt_attention: [n] attention each visual token receives from the first turn's
            prompt at LLM layer K (fastv).
        prompt_embeddings: [t, d] the first turn's prompt (text) tokens embedded in the visual
            tokens' space, the LLM's input embedding space (cdpruner); t may be 0.
    """

    positions: Tensor | None = None
    grid: tuple[int, int] | None = None
    cls_attention: Tensor | None = None
    keys: Tensor | None = None
    prompt_attention: Tensor | None = None
    prompt_embeddings: Tensor | None = None

    def check(self, n: int, *, where: str = "TokenContext") -> None:
        """Raise ValueError naming the field when a present field does not fit n tokens."""
        shapes = {
            "positions": (n, 2),
            "cls_attention": (n,),
            "prompt_attention": (n,),
        }
        for field, shape in shapes.items():
            value = getattr(self, field)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"{where}.{field} has shape {tuple(value.shape)}, expected {shape} "
                    f"for n = {n} tokens"
                )
        if self.keys is not None and (self.keys.dim() != 2 or self.keys.shape[0] != n):
            raise ValueError(f"{where}.keys has shape {tuple(self.keys.shape)}, expected ({n}, k)")
        # Its width is the tokens' d, which only the compressor knows: it checks that part.
        if self.prompt_embeddings is not None and self.prompt_embeddings.dim() != 2:
            raise ValueError(
                f"{where}.prompt_embeddings has shape {tuple(self.prompt_embeddings.shape)}, "
                "expected (t, d)"
            )
        if self.grid is not None:
            h, w = self.grid
            if h * w != n:
                raise ValueError(f"{where}.grid {tuple(self.grid)} has {h * w} cells, n = {n}")


class Compressor(nn.Module):
    """Base class: subclasses implement ``_compress(x [n, d], ctx) -> (Y [m, d], P [m, n])``.

    ``forward`` validates the input, the context and the needed fields, and maps over lists
    (several images, each with its own n). P is float32 on the tokens' device; Y has the
    tokens' dtype.

    ``rate`` is the compressor's default; ``forward(..., rate=r)`` compresses one call at ``r``
    instead. Subclasses read the rate only through ``kept(n)`` (never ``self.rate``) and key any
    cached rate-dependent table by ``m``, so a per-call rate gives exactly the P of a compressor
    built at ``r`` (with the same weights). ``trained_rates`` says which rates a trainable
    compressor's weights were trained for (``None``: ``rate`` alone; a checkpoint records it).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    prompt_dependent: ClassVar[bool] = False
    trainable: ClassVar[bool] = False

    def __init__(self, *, rate: float, dim: int) -> None:
        super().__init__()
        self.rate = self._check_rate(rate)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"{self.name} dim must be a positive int, got {dim!r}")
        self.dim = int(dim)
        # The rate of the call in progress (forward's rate=); None: self.rate.
        self._call_rate: float | None = None
        # [lo, hi] (a range) or >= 3 rates (a set) the weights were trained over; None: rate.
        self.trained_rates: tuple[float, ...] | None = None

    @classmethod
    def _check_rate(cls, rate: float, where: str = "rate") -> float:
        return check_rate(rate, where=f"{cls.name} {where}")

    def kept(self, n: int) -> int:
        """Tokens kept for an image of n tokens (at the call's rate while ``forward`` runs with
        ``rate=``, else at ``self.rate``)."""
        rate = self.rate if self._call_rate is None else self._call_rate
        return kept_tokens(n, rate, where=f"{self.name} rate")

    def rate_span(self) -> tuple[float, float]:
        """The lowest and highest rate this compressor is meant to run at: the span of
        ``trained_rates`` (a set serves the rates between its members too), else ``(rate,
        rate)`` for a trainable one; ``(0, 1)`` for a heuristic, which fits every rate."""
        if self.trained_rates is not None:
            return min(self.trained_rates), max(self.trained_rates)
        return (self.rate, self.rate) if self.trainable else (0.0, 1.0)

    def serves(self, rate: float, *, tol: float = 1e-9) -> bool:
        """Whether ``rate`` lies in ``rate_span()`` (to ``tol``, for rates read from text)."""
        lo, hi = self.rate_span()
        return lo - tol <= float(rate) <= hi + tol

    def config(self) -> dict:
        """Constructor keywords beyond rate and dim; ``build(name, rate, dim, **config())``
        rebuilds an equivalent module (weights aside)."""
        return {}

    def extra_repr(self) -> str:
        return f"rate={self.rate}, dim={self.dim}"

    def forward(
        self,
        tokens: Tensor | list[Tensor],
        ctx: TokenContext | list[TokenContext | None] | None = None,
        *,
        rate: float | Sequence[float | None] | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Compress one image's tokens [n, d], or a list of them.

        Args:
            tokens: [n, d] tensor, or a list of [n_i, d] tensors (one per image).
            ctx: A TokenContext for a single tensor; a list of contexts (or None) for a list.
            rate: Compress at this rate instead of ``self.rate`` (checked as the constructor
                checks it); for a list input also one rate (or None) per image. The module is
                unchanged afterwards. The override lives on the module while the call runs, so
                one module must not serve concurrent calls from several threads (serving runs
                one model per thread).

        Returns:
            ``(Y [m, d], P [m, n])``, or ``(list[Y_i], list[P_i])`` for a list input.

        Raises:
            ValueError: Bad shapes, a context that does not match, a needed field missing, or
                a bad rate (named).
        """
        if isinstance(tokens, (list, tuple)):
            if isinstance(ctx, TokenContext):
                raise ValueError(
                    f"{self.name}: a list of token tensors needs a list of contexts, "
                    "got a single TokenContext"
                )
            ctxs = [None] * len(tokens) if ctx is None else list(ctx)
            if len(ctxs) != len(tokens):
                raise ValueError(
                    f"{self.name}: {len(tokens)} token tensors but {len(ctxs)} contexts"
                )
            rates = self._call_rates(rate, len(tokens))
            pairs = [
                self._one(t, c, f"image {i}", r)
                for i, (t, c, r) in enumerate(zip(tokens, ctxs, rates, strict=True))
            ]
            return [y for y, _ in pairs], [p for _, p in pairs]
        if isinstance(ctx, (list, tuple)):
            raise ValueError(
                f"{self.name}: a single token tensor takes one TokenContext, got a list"
            )
        if isinstance(rate, (list, tuple)):
            raise ValueError(f"{self.name}: a single token tensor takes one rate, got {rate!r}")
        return self._one(tokens, ctx, "tokens", self._call_rates(rate, 1)[0])

    def _call_rates(self, rate, count: int) -> list[float | None]:
        """``forward``'s ``rate=`` as one checked rate (or None) per image."""
        if rate is None:
            return [None] * count
        if isinstance(rate, (list, tuple)):
            if len(rate) != count:
                raise ValueError(
                    f"{self.name}: rate= gives {len(rate)} rates for {count} token tensors"
                )
            return [
                None if r is None else self._check_rate(r, f"rate[{i}] (per call)")
                for i, r in enumerate(rate)
            ]
        return [self._check_rate(rate, "rate (per call)")] * count

    def _one(
        self, x: Tensor, ctx: TokenContext | None, where: str, rate: float | None = None
    ) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: {where} must be a [n, d] tensor, got {shape}")
        if x.shape[1] != self.dim:
            raise ValueError(
                f"{self.name}: {where} have dim {x.shape[1]}, compressor built for {self.dim}"
            )
        if x.shape[0] < 1:
            raise ValueError(f"{self.name}: {where} has no tokens")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: {where} must be floating point, got {x.dtype}")
        ctx = TokenContext() if ctx is None else ctx
        ctx.check(x.shape[0], where=f"{self.name} context of {where}")
        for field in sorted(self.needs):
            if getattr(ctx, field) is None:
                raise ValueError(
                    f"{self.name} needs TokenContext.{field} for {where}, but it is missing "
                    "(the adapter fills it when asked via Compressor.needs)"
                )
        if rate is None:
            return self._compress(x, ctx)
        outer, self._call_rate = self._call_rate, rate
        try:
            return self._compress(x, ctx)
        finally:
            self._call_rate = outer

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @staticmethod
    def _select(x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Pruning: gather rows (exactly P @ x for one-hot P, and NaN-safe) plus the one-hot P."""
        index = index.to(device=x.device, dtype=torch.long)
        return x.index_select(0, index), selection_matrix(index, x.shape[0])

    @staticmethod
    def _merge(x: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
        """Merging: Y = P @ x in x's dtype, P kept in float32."""
        P = P.to(device=x.device, dtype=torch.float32)
        return apply(P, x), P


def context_tensor(value: Tensor, x: Tensor) -> Tensor:
    """A context field as float32 on the tokens' device (scores are compared in float32)."""
    return value.detach().to(device=x.device, dtype=torch.float32)
