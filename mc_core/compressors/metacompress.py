"""The MetaCompress generator: a learned, prompt-agnostic P from pooled queries and token keys.

Paper (arXiv 2603.21701, Sec. 4; see ../shared/paper-spec.md)::

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

from mc_core.compressors.base import Compressor, TokenContext
from mc_core.ops import apply, pool_layout, pool_matrix


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


class MetaCompress(Compressor):
    """Learned meta-generator of P (MetaCompress, CVPR 2026, arXiv 2603.21701)."""

    name = "metacompress"
    trainable = True

    def __init__(
        self,
        *,
        rate: float,
        dim: int,
        d_c: int = 64,
        beta_init: float = 1.0,
        pos_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(rate=rate, dim=dim)
        if isinstance(d_c, bool) or not isinstance(d_c, int) or d_c < 1:
            raise ValueError(f"metacompress d_c must be a positive int, got {d_c!r}")
        for key, value in (("beta_init", beta_init), ("pos_scale", pos_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"metacompress {key} must be a finite number >= 0, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"metacompress seed must be an int, got {seed!r}")
        self.d_c = d_c
        self.beta_init = float(beta_init)
        self.pos_scale = float(pos_scale)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        # N(0, 1/d): a random projection with E[W W^T] = (d_c / d) I, so q . k ~ (d_c/d) z . z'.
        w = torch.randn(dim, d_c, generator=gen) / math.sqrt(dim)
        self.w_q = nn.Parameter(w.clone())
        self.w_k = nn.Parameter(w.clone())  # W_q = W_k at init (paper)
        self.beta = nn.Parameter(torch.full((d_c,), self.beta_init))
        self._pos_cache: tuple | None = None

    def config(self) -> dict:
        return {
            "d_c": self.d_c,
            "beta_init": self.beta_init,
            "pos_scale": self.pos_scale,
            "seed": self.seed,
        }

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
        }

    def _positional(self, n: int, m: int, ctx: TokenContext, device: torch.device) -> Tensor:
        """E_pos [n, d] for this layout, cached for the last layout seen (images of one model
        mostly share it, and the sin/cos table costs as much as the projections on CPU)."""
        pos = ctx.positions
        key = (n, m, self.dim, str(device), tuple(ctx.grid) if ctx.grid else None)
        cached = self._pos_cache
        if cached is not None and cached[0] == key:
            same = (cached[1] is None and pos is None) or (
                cached[1] is not None and pos is not None and torch.equal(cached[1], pos.to(device))
            )
            if same:
                return cached[2]
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
        emb = sincos_embedding(coords.float(), self.dim, cell)  # (n, d)
        self._pos_cache = (key, None if pos is None else pos.detach().to(device).clone(), emb)
        return emb

    def _compress(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        m = self.kept(n)
        xf = x.float()
        centred = xf - xf.mean(dim=0, keepdim=True)
        # Unit per-entry RMS: the logits' scale no longer depends on the LVLM's token norms.
        x_hat = centred / centred.pow(2).mean().sqrt().clamp_min(1e-6)  # (n, d)
        z = x_hat + self.pos_scale * self._positional(n, m, ctx, x.device)  # (n, d)
        proj = z @ torch.cat([self.w_q, self.w_k], dim=1).float()  # (n, 2 d_c)
        pool = pool_matrix(n, m, ctx.grid, device=x.device)  # (m, n)
        # Pool(Z) W_q = Pool(Z W_q): pooling after the projection costs m n d_c, not m n d.
        q = pool @ proj[:, : self.d_c]  # (m, d_c)
        k = proj[:, self.d_c :]  # (n, d_c)
        logits = (q * self.beta.float()) @ k.T / math.sqrt(self.d_c)  # (m, n)
        P = torch.softmax(logits, dim=-1)
        if x.is_inference() and P.requires_grad:
            # Tokens cached under torch.inference_mode() cannot be saved for P's backward;
            # a plain copy can (the frozen LVLM's features are often precomputed that way).
            x = x.clone()
        return apply(P, x), P
