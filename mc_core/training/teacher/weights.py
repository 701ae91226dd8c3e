"""Initial weights of a teacher: a 2-D position table for CLIP towers, or another teacher's."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mc_core.models import zoo

__all__ = ["init_from", "init_positions", "sincos_2d"]


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos table ``[h * w, dim]`` (half the channels for rows, half for columns)."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * freq[None]
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def init_positions(model) -> None:
    """Towers with a learned position table (CLIP): a 2-D sin-cos init (a random table slows
    stage 1 down a lot). Rotary towers (Qwen2-VL) are left alone."""
    tower = getattr(model.model, "vision_tower", None)
    emb = getattr(tower, "embeddings", None)
    if emb is None or not hasattr(emb, "position_embedding"):
        return
    table = emb.position_embedding.weight  # (1 + g*g, d): CLS first
    g = int(round(math.sqrt(table.shape[0] - 1)))
    with torch.no_grad():
        table[1:] = sincos_2d(g, g, table.shape[1]) * 0.5
        table[0] = 0.0


def init_from(model, path: str) -> list[str]:
    """Copies the tensors of a saved base model with the same name and shape into ``model``.

    Raises:
        ValueError: ``path`` is not a saved base model, or nothing matches (wrong family).
    """
    if not (Path(path) / "zoo.json").is_file():
        raise ValueError(f"base.init_from={path!r}: no saved base model there (train it first)")
    source, _ = zoo.load(path)
    mine = model.state_dict()
    taken = {k: v for k, v in source.state_dict().items() if k in mine and mine[k].shape == v.shape}
    if not taken:
        raise ValueError(f"base.init_from={path!r}: no tensor matches {type(model).__name__}")
    model.load_state_dict(taken, strict=False)
    return sorted(taken)
