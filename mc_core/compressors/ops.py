"""P algebra: every token reducer as a row-stochastic matrix.

MetaCompress ("Rethinking Token Reduction for Large Vision-Language Models", CVPR 2026,
arXiv 2603.21701) writes every reducer as ``Y = P @ X`` with ``X`` [n, d] the visual tokens and
``P`` [m, n] non-negative with rows on the simplex: one-hot rows prune, convex rows merge. This
module holds the pure tensor functions shared by every compressor: rate checks, selection and
fractional pooling matrices, application and validation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "apply",
    "check_rate",
    "check_rates",
    "kept_tokens",
    "pool_layout",
    "pool_matrix",
    "pool_taps",
    "selection_matrix",
    "validate",
]


def check_rate(rate: float, *, where: str = "rate") -> float:
    """Return ``rate`` as a float after checking ``0 < rate < 1``.

    Args:
        rate: Fraction of visual tokens removed (0.9 keeps 10%).
        where: Name of the value in the error message (a params key, an argument).

    Raises:
        ValueError: Naming ``where`` and the value when the rate is not a number in (0, 1)
            (NaN included).
    """
    # Strings are refused even when numeric: a quoted rate in a config is a bug worth seeing.
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ValueError(f"{where} must be a number in (0, 1), got {rate!r}")
    value = float(rate)
    # NaN fails both comparisons, so it lands here too.
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{where} must be in (0, 1) (the fraction of tokens removed), got {rate!r}"
        )
    return value


def check_rates(rates: Sequence[float], *, where: str = "rates") -> tuple[float, ...]:
    """``rates`` as a tuple after checking it: two rates ``lo < hi`` (a range) or three or
    more distinct rates (a set), each in (0, 1): what an any-rate compressor was trained over
    (``TrainConfig.rates``, a checkpoint's ``rates``).

    Raises:
        ValueError: naming ``where`` and the bad value.
    """
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence):
        raise ValueError(f"{where}={rates!r}: expected a list of rates ([lo, hi] or three or more)")
    values = tuple(check_rate(r, where=f"{where}[{i}]") for i, r in enumerate(rates))
    if len(values) < 2:
        raise ValueError(
            f"{where}={list(rates)!r}: expected [lo, hi] (a range) or three or more rates "
            "(a set); for one rate, train at that rate alone (rates None)"
        )
    if len(values) == 2 and not values[0] < values[1]:
        raise ValueError(f"{where}={list(rates)!r}: a range [lo, hi] needs lo < hi")
    if len(set(values)) != len(values):
        raise ValueError(f"{where}={list(rates)!r}: the rates of a set must be distinct")
    return values


def kept_tokens(n: int, rate: float, *, where: str = "rate") -> int:
    """Number of tokens kept, ``m = ceil((1 - rate) * n)``, at least 1.

    Args:
        n: Number of input tokens (>= 1).
        rate: Reduction rate in (0, 1).
        where: Name of the rate in error messages.

    Raises:
        ValueError: Bad ``n`` or rate.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"number of tokens must be a positive int, got {n!r}")
    n = int(n)
    r = check_rate(rate, where=where)
    # Round before ceil: (1 - 0.9) * 1000 is 99.99999999999997 in floats, and a product that
    # lands a hair above an integer must not gain a token.
    m = math.ceil(round((1.0 - r) * n, 9))
    return max(1, min(n, m))


def selection_matrix(index: Tensor, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot ``P`` [m, n] with ``P[i, index[i]] = 1`` (pruning), on ``index``'s device.

    Raises:
        ValueError: ``index`` not 1-D or out of ``[0, n)``.
    """
    if index.dim() != 1:
        raise ValueError(f"selection index must be 1-D, got shape {tuple(index.shape)}")
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(
            f"selection index out of range [0, {n}): min {int(index.min())}, max {int(index.max())}"
        )
    P = torch.zeros(index.numel(), n, dtype=dtype, device=index.device)
    P[torch.arange(index.numel(), device=index.device), index] = 1.0
    return P


def apply(P: Tensor, x: Tensor) -> Tensor:
    """Compressed tokens ``P @ x`` [m, d], computed in ``x``'s dtype and on its device.

    Raises:
        ValueError: Shapes that do not chain ([m, n] @ [n, d]).
    """
    if P.dim() != 2 or x.dim() != 2 or P.shape[1] != x.shape[0]:
        raise ValueError(
            f"apply needs P [m, n] and x [n, d], got P {tuple(P.shape)} and x {tuple(x.shape)}"
        )
    return P.to(dtype=x.dtype, device=x.device) @ x


def validate(P: Tensor, n: int, m: int | None = None, *, atol: float = 1e-4) -> None:
    """Check the P contract: shape [m, n], finite, ``P >= 0``, rows summing to 1.

    Args:
        P: The matrix to check.
        n: Expected number of columns (input tokens).
        m: Expected number of rows, if known.
        atol: Tolerance on row sums. The default 1e-4 covers float32 sums over a few thousand
            softmax entries (relative error ~1e-7 each).

    Raises:
        ValueError: Naming the first violated property.
    """
    if P.dim() != 2:
        raise ValueError(f"P must be 2-D [m, n], got shape {tuple(P.shape)}")
    if P.shape[1] != n:
        raise ValueError(f"P has {P.shape[1]} columns, expected n = {n}")
    if m is not None and P.shape[0] != m:
        raise ValueError(f"P has {P.shape[0]} rows, expected m = {m}")
    Pf = P.detach().float()
    if not torch.isfinite(Pf).all():
        raise ValueError("P has non-finite entries")
    if Pf.numel() and float(Pf.min()) < 0:
        raise ValueError(f"P has negative entries (min {float(Pf.min()):.3g})")
    err = (Pf.sum(dim=1) - 1.0).abs()
    if err.numel() and float(err.max()) > atol:
        row = int(err.argmax())
        raise ValueError(
            f"P row {row} sums to {float(Pf[row].sum()):.6g}, expected 1 (atol {atol})"
        )


# How far (as a factor) a divisor of m may sit from the ideal band count and still be preferred:
# a regular grid is worth slightly off-square cells (8 x 8 -> 32 keeps 4 bands of 8, cells 2:1),
# but not one band of strips (8 x 8 -> 7 takes 3 uneven bands instead).
_REGULAR_SLACK = 1.5


def _interval_weights(n: int, m: int, device: torch.device | str | None = None) -> Tensor:
    """Fractional 1-D average pooling [m, n]: output i averages the span [i n/m, (i+1) n/m).

    Token j covers [j, j+1); its weight in output i is the overlap length divided by the span
    length n/m. Scaling every length by m keeps the arithmetic in integers, so the weights are
    exact multiples of 1/n and each row sums to 1 up to one float32 division.
    """
    j = torch.arange(n, device=device)
    i = torch.arange(m, device=device)
    lo = torch.maximum(j[None, :] * m, i[:, None] * n)
    hi = torch.minimum((j[None, :] + 1) * m, (i[:, None] + 1) * n)
    return (hi - lo).clamp_min(0).to(torch.float32) / n  # (m, n)


def pool_layout(h: int, w: int, m: int) -> list[int]:
    """Cells per pooled row band when pooling an h x w grid to m tokens.

    The number of bands follows the grid's aspect ratio (``h' ~ sqrt(m h / w)``, so cells come
    out about square). A divisor of m within a factor ``_REGULAR_SLACK`` of that ideal gives a
    regular h' x w' grid; otherwise (a prime m, say) the bands are uneven: ``round(h')`` bands
    whose cell counts differ by at most one. Never fewer than 2 bands when the ideal is >= 1.5:
    one band of m full-height strips (what a prime m used to get) leaves no vertical structure.
    At most ``h`` bands, so a band never splits a token row into sub-rows.
    """
    ideal = math.sqrt(m * h / w)
    near = [
        b
        for b in range(max(1, math.floor(ideal) - 1), math.ceil(ideal) + 2)
        if m % b == 0 and abs(math.log(b / ideal)) <= math.log(_REGULAR_SLACK)
    ]
    bands = min(near, key=lambda b: abs(b - ideal)) if near else max(1, round(ideal))
    bands = max(1, min(m, h, bands))
    return [(r + 1) * m // bands - r * m // bands for r in range(bands)]


def pool_matrix(
    n: int,
    m: int,
    grid: tuple[int, int] | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Fractional average pooling from n to m tokens as a float32 ``P`` [m, n].

    Without a grid the sequence is pooled in 1-D (output i averages the span [i n/m,
    (i+1) n/m), partial tokens weighted by overlap). With ``grid = (h, w)`` (row-major tokens)
    the grid is cut into ``pool_layout(h, w, m)`` row bands, each band into its cells, and each
    cell averages its fractional rectangle; where h and w divide evenly this equals
    ``torch.nn.functional.adaptive_avg_pool2d``. Rows are convex for every n >= m >= 1.

    Raises:
        ValueError: ``m`` not in [1, n] or a grid whose area is not n.
    """
    if not 1 <= m <= n:
        raise ValueError(f"pooling needs 1 <= m <= n, got n = {n}, m = {m}")
    if grid is None:
        return _interval_weights(n, m, device)
    h, w = (int(v) for v in grid)
    if h * w != n:
        raise ValueError(f"grid {tuple(grid)} has {h * w} cells but there are n = {n} tokens")
    counts = pool_layout(h, w, m)
    bands = _interval_weights(h, len(counts), device)  # (h', h)
    rows = []
    for r, k in enumerate(counts):
        cols = _interval_weights(w, k, device)  # (k, w)
        rows.append((bands[r][None, :, None] * cols[:, None, :]).reshape(k, n))
    return torch.cat(rows, dim=0)  # (m, n)


def _interval_taps(n: int, m: int, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """``_interval_weights(n, m)`` as per-row taps: (index [m, k], weight [m, k]).

    Output i overlaps tokens floor(i n/m) .. ceil((i+1) n/m) - 1; the weights use the same
    integer overlap formula, so they equal the dense matrix's entries bit for bit.
    """
    i = torch.arange(m, device=device)
    start = i * n // m  # (m,)
    end = ((i + 1) * n + m - 1) // m  # (m,) one past the last overlapping token
    k = int((end - start).max())
    j = start[:, None] + torch.arange(k, device=device)  # (m, k)
    lo = torch.maximum(j * m, i[:, None] * n)
    hi = torch.minimum((j + 1) * m, (i[:, None] + 1) * n)
    weight = (hi - lo).clamp_min(0).to(torch.float32) / n  # (m, k)
    # Short rows' padding would run past the row (or past n): point it at the first tap.
    index = torch.where(weight > 0, j, start[:, None])
    return index, weight


def pool_taps(
    n: int,
    m: int,
    grid: tuple[int, int] | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``pool_matrix(n, m, grid)`` as its nonzeros, padded to the same count k per row.

    Each pooling row touches only its window (about n/m tokens plus the partial ones at the
    edges), so ``(x[index] * weight[..., None]).sum(1)`` equals ``pool_matrix(...) @ x`` (up to
    float32 summation order) at m k d cost instead of m n d, and stays differentiable in x.
    Built directly from the windows (no dense [m, n] matrix).

    Returns:
        ``(index [m, k] long, weight [m, k] float32)``; the weights are ``pool_matrix``'s
        nonzero entries exactly; padding entries have weight 0 and repeat the row's first
        index, so a NaN or inf elsewhere in x cannot leak in through a 0 weight.

    Raises:
        ValueError: As ``pool_matrix``.
    """
    if not 1 <= m <= n:
        raise ValueError(f"pooling needs 1 <= m <= n, got n = {n}, m = {m}")
    if grid is None:
        return _interval_taps(n, m, device)
    h, w = (int(v) for v in grid)
    if h * w != n:
        raise ValueError(f"grid {tuple(grid)} has {h * w} cells but there are n = {n} tokens")
    counts = pool_layout(h, w, m)
    band_index, band_weight = _interval_taps(h, len(counts), device)  # (h', kb)
    indices, weights = [], []
    for r, k in enumerate(counts):
        col_index, col_weight = _interval_taps(w, k, device)  # (k, kc)
        # Cell = band rows x cell columns, the same products as pool_matrix's outer product.
        idx = band_index[r][None, :, None] * w + col_index[:, None, :]  # (k, kb, kc)
        wt = band_weight[r][None, :, None] * col_weight[:, None, :]  # (k, kb, kc)
        indices.append(idx.reshape(k, -1))
        weights.append(wt.reshape(k, -1))
    width = max(t.shape[1] for t in indices)
    index = torch.cat(
        [torch.cat([t, t[:, :1].expand(-1, width - t.shape[1])], dim=1) for t in indices]
    )  # (m, width)
    weight = torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in weights]
    )  # (m, width)
    # Band/column padding (weight 0) may point anywhere in the grid: use the row's first tap.
    index = torch.where(weight > 0, index, index[:, :1])
    return index, weight
