"""The MetaCompress generator: a learned, prompt-agnostic P from pooled queries and token keys.

Paper (arXiv 2603.21701, Sec. 4; see docs/method.md)::

    Q = Pool(X + E_pos -> m) W_q      (m, d_c)   fractional average pooling, any n -> any m
    K = (X + E_pos) W_k               (n, d_c)
    P = softmax_row(Q diag(beta) K^T / sqrt(d_c)),   Y = P X   (values are the raw tokens)

Only ``W_q``, ``W_k`` (d x d_c) and ``beta`` (d_c) are parameters; ``W_q = W_k`` at init.

Our choices where the paper is silent (each a constructor keyword, recorded in
``generator_config()`` for the checkpoint fingerprint):

* **Scale.** LVLM projector outputs share a large common component and have norms in the tens
  to hundreds, which would swamp any positional term and make the softmax temperature depend on
  the model. Before projecting, tokens are centred over the image and divided by their RMS
  (parameter-free), so ``X_hat`` has unit per-entry RMS whatever the model; ``E_pos`` is scaled
  to unit per-entry RMS too, and ``pos_scale`` weighs it against the content.
* **E_pos.** Fixed sin-cos features of the token positions: 2-D (half the channels per axis)
  from ``ctx.positions`` or the grid, 1-D over the sequence when neither is known. Frequencies
  are spread linearly up to ``pi / cell``, where ``cell`` is the size of one pooling window in
  the same normalised units, so the positional kernel ``E_i . E_j`` is a sinc-like bump about one
  pooling window wide (the geometric frequencies of transformer encodings give a log-decaying
  kernel that is far too flat to localise a softmax).
  ``pos_width`` scales that window (wider: each row may reach further from its own window;
  tiny-qwen2-vl at rate 0.5 on data/val: x0.5 / 0.7 / 1 / 1.5 / 2 gave 0.853 / 0.896 / 0.904 /
  0.874 / 0.880, so one window it is).
* **Init.** ``W_q = W_k`` with i.i.d. N(0, 1/d) entries and ``beta = beta_init`` everywhere.
  Then ``Q K^T`` approximates ``(d_c / d) Pool(Z) Z^T`` (a random projection), so each row of P
  is a softmax over the similarity of a token to its window's mean: weighted pooling with a
  spatial prior. ``beta_init`` and ``pos_scale`` were chosen so that most of each row's mass lies
  in its own pooling window (``tests/test_compressors.py`` measures it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mc_core.compressors import register
from mc_core.compressors.base import Compressor, TokenContext
from mc_core.compressors.ops import apply, pool_layout, pool_taps


def sincos_embedding(pos: Tensor, dim: int, cell: tuple[float, ...]) -> Tensor:
    """Fixed sin-cos features [n, dim] with unit per-entry RMS (unused tail channels are 0).

    Args:
        pos: [n, k] float coordinates in [0, 1] (k = 1 for a sequence, 2 for (row, col)).
        dim: Output channels; each axis gets ``dim // (2 k)`` frequencies (a sin and a cos).
        cell: Pooling-window size per axis in the same units; the highest frequency is
            ``pi / cell``, which puts the kernel's first zero about one window away.
    """
    n, k = pos.shape
    per_axis = dim // (2 * k)
    emb = torch.zeros(n, dim, dtype=torch.float32, device=pos.device)  # unused tail stays 0
    steps = torch.arange(1, per_axis + 1, dtype=torch.float32, device=pos.device)
    for a in range(k):
        omega = (math.pi / cell[a]) * steps / per_axis  # (F,) linear up to pi / cell
        # Tokens share few distinct coordinates per axis (rows, columns): take sin/cos once
        # per value and gather, instead of n * F transcendentals.
        values, inverse = torch.unique(pos[:, a].float(), return_inverse=True)
        angle = values[:, None] * omega  # (u, F)
        # sin^2 + cos^2 = 1, so each channel has mean square 1/2: sqrt(2) makes its RMS 1.
        lo = 2 * a * per_axis
        emb[:, lo : lo + per_axis] = (angle.sin() * math.sqrt(2.0))[inverse]
        emb[:, lo + per_axis : lo + 2 * per_axis] = (angle.cos() * math.sqrt(2.0))[inverse]
    return emb  # (n, dim)


_CACHE_SIZE = 8  # layouts kept per generator (a batch mixes a few image shapes)


@register("metacompress")
class MetaCompress(Compressor):
    """Learned meta-generator of P (MetaCompress, CVPR 2026, arXiv 2603.21701)."""

    trainable = True

    def __init__(
        self,
        *,
        rate: float,
        dim: int,
        d_c: int = 64,
        beta_init: float = 1.0,
        pos_scale: float = 1.0,
        pos_width: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(rate=rate, dim=dim)
        if isinstance(d_c, bool) or not isinstance(d_c, int) or d_c < 1:
            raise ValueError(f"metacompress d_c must be a positive int, got {d_c!r}")
        for key, value in (
            ("beta_init", beta_init),
            ("pos_scale", pos_scale),
            ("pos_width", pos_width),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0)
                or (key == "pos_width" and value == 0)
            ):
                low = "> 0" if key == "pos_width" else ">= 0"
                raise ValueError(f"metacompress {key} must be a finite number {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"metacompress seed must be an int, got {seed!r}")
        self.d_c = d_c
        self.beta_init = float(beta_init)
        self.pos_scale = float(pos_scale)
        self.pos_width = float(pos_width)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        # N(0, 1/d): a random projection with E[W W^T] = (d_c / d) I, so q . k ~ (d_c/d) z . z'.
        w = torch.randn(dim, d_c, generator=gen) / math.sqrt(dim)
        self.w_q = nn.Parameter(w.clone())
        self.w_k = nn.Parameter(w.clone())  # W_q = W_k at init (paper)
        self.beta = nn.Parameter(torch.full((d_c,), self.beta_init))
        # Per-layout constants (E_pos, pooling taps), most recent first; None = empty.
        self._pos_cache: list[tuple] | None = None

    def config(self) -> dict:
        out = {
            "d_c": self.d_c,
            "beta_init": self.beta_init,
            "pos_scale": self.pos_scale,
            "seed": self.seed,
        }
        # Recorded only off its default, so checkpoints saved before the knob keep their bytes.
        if self.pos_width != 1.0:
            out["pos_width"] = self.pos_width
        return out

    def generator_config(self) -> dict:
        """Everything that fixes the generator's function besides its weights (fingerprint)."""
        return {
            "d": self.dim,
            "d_c": self.d_c,
            "pos": "sincos-linear",
            "pos_scale": self.pos_scale,
            "norm": "center-rms",
            "pool": "fractional",
            "beta_init": self.beta_init,
            **({"pos_width": self.pos_width} if self.pos_width != 1.0 else {}),
        }

    def _layout(
        self, n: int, m: int, ctx: TokenContext, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(pos_scale * E_pos [n, d], pooling index [m, k], weight [m, k]) for this layout.

        They depend only on (n, m, grid, positions, device), not on the tokens or the weights,
        so the last `_CACHE_SIZE` layouts are kept: images of one model mostly share a layout,
        and rebuilding the sin/cos table and pooling matrix cost as much as the projections on
        CPU. Entries are built outside inference mode (and without grad) so a table first
        made under `torch.inference_mode()` can still be saved for a later training backward.
        """
        pos = ctx.positions
        grid = tuple(int(v) for v in ctx.grid) if ctx.grid is not None else None
        key = (n, m, self.dim, self.pos_scale, self.pos_width, str(device), grid)
        cache = self._pos_cache or []
        for i, (k, p, tables) in enumerate(cache):
            if k == key and (
                (p is None and pos is None)
                or (p is not None and pos is not None and torch.equal(p, pos.to(device)))
            ):
                if i:
                    cache.insert(0, cache.pop(i))
                return tables
        with torch.inference_mode(False), torch.no_grad():
            emb = self.pos_scale * self._sincos(n, m, ctx, device)  # (n, d)
            index, weight = pool_taps(n, m, grid, device=device)  # (m, k) each
            stored = None if pos is None else pos.detach().to(device).clone()
        tables = (emb, index, weight)
        self._pos_cache = [(key, stored, tables), *cache[: _CACHE_SIZE - 1]]
        return tables

    def _sincos(self, n: int, m: int, ctx: TokenContext, device: torch.device) -> Tensor:
        """E_pos [n, d] for this layout, unit per-entry RMS."""
        pos = ctx.positions
        if ctx.grid is not None:
            h, w = ctx.grid
            bands = len(pool_layout(h, w, m))
            cell = (1.0 / bands, bands / m)  # (row, col) size of one pooling window
            if pos is None:
                rr, cc = torch.meshgrid(
                    (torch.arange(h, device=device) + 0.5) / h,
                    (torch.arange(w, device=device) + 0.5) / w,
                    indexing="ij",
                )
                coords = torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)
            else:
                coords = pos.to(device)
        elif pos is not None:
            # Packed / irregular layouts: pooling runs over the sequence, the prior over the
            # image, with a square window of the same area as a pooling window.
            coords = pos.to(device)
            cell = (1.0 / math.sqrt(m), 1.0 / math.sqrt(m))
        else:
            coords = ((torch.arange(n, device=device) + 0.5) / n)[:, None]
            cell = (1.0 / m,)
        cell = tuple(c * self.pos_width for c in cell)
        return sincos_embedding(coords.float(), self.dim, cell)  # (n, d)

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        xf = x.float()
        centred = xf - xf.mean(dim=0)  # (n, d)
        # Unit per-entry RMS: the logits' scale no longer depends on the LVLM's token norms.
        # Norm of the row norms: one read of `centred` (var_mean over dim 0 is ~10x slower on
        # CPU), and summing per row first keeps float32 within ~1e-7 of a float64 norm where
        # one flat norm over n d entries drifts by ~1e-4 at n = 2928.
        root = math.sqrt(centred.numel())
        norm = torch.linalg.vector_norm(torch.linalg.vector_norm(centred, dim=1))
        inv_rms = root / norm.clamp_min(1e-6 * root)  # 1 / RMS
        pos, index, weight = self._layout(n, m, ctx, x.device)
        z = torch.addcmul(pos, centred, inv_rms)  # (n, d) = x_hat + pos_scale * E_pos
        proj = z @ torch.cat([self.w_q, self.w_k], dim=1).float()  # (n, 2 d_c)
        # Pool(Z) W_q = Pool(Z W_q): pooling after the projection, and only over each window's
        # taps: m k d_c instead of the dense m n d_c.
        q = (proj[:, : self.d_c][index] * weight[..., None]).sum(dim=1)  # (m, d_c)
        k = proj[:, self.d_c :]  # (n, d_c)
        # Scale the m x d_c queries rather than the m x n logits.
        logits = (q * (self.beta.float() / math.sqrt(self.d_c))) @ k.T  # (m, n)
        P = torch.softmax(logits, dim=-1)
        if x.is_inference() and P.requires_grad:
            # Tokens cached under torch.inference_mode() cannot be saved for P's backward;
            # a plain copy can (the frozen LVLM's features are often precomputed that way).
            x = x.clone()
        return apply(P, x), P
