"""The file an embedding worker hands to an inference engine: one image's compressed tokens.

One safetensors file (no pickle) per image:

    image_embeds    [m, d]  the tokens in the LLM's input space (projector output, compressed)
    image_grid_thw  [1, 3]  Qwen-family only: the (t, h, w) patch grid the engine lays the m
                            tokens on, h * w / merge^2 == m (see mc_core.inference.serving)

and string metadata: ``format`` (``metacompress-embeds/1``), ``family``, ``n`` (tokens before
compression), ``m``, plus whatever the writer adds (model, compressor). The engine-side client
(mc_vllm, another venv with another transformers) reads it too, so this module imports only
torch, safetensors and mc_core.io.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mc_core.io import staged_file

__all__ = ["FORMAT", "ImageEmbeds", "load_embeds", "save_embeds"]

FORMAT = "metacompress-embeds/1"


@dataclass
class ImageEmbeds:
    """One image's compressed tokens and what an engine needs beside them.

    Attributes:
        embeds: [m, d] tokens in the LLM's input space.
        family: the adapter family that produced them (``llava``, ``qwen2_vl``, ...).
        n: visual tokens before compression.
        grid_thw: Qwen family: (1, h, w) in patches with h * w / merge^2 == m; else None.
        meta: extra string facts (model, compressor) stored in the file.
    """

    embeds: Tensor
    family: str
    n: int
    grid_thw: tuple[int, int, int] | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, Tensor) or self.embeds.dim() != 2:
            shape = getattr(self.embeds, "shape", type(self.embeds).__name__)
            raise ValueError(f"embeds: expected a [m, d] tensor, got {shape}")
        if self.grid_thw is not None and len(self.grid_thw) != 3:
            raise ValueError(f"grid_thw={self.grid_thw!r}: expected (t, h, w)")

    @property
    def m(self) -> int:
        """Tokens kept."""
        return int(self.embeds.shape[0])


def save_embeds(emb: ImageEmbeds, path: str | os.PathLike) -> Path:
    """Writes `emb` to `path` (a ``.safetensors`` file), atomically."""
    tensors = {"image_embeds": emb.embeds.detach().cpu().contiguous()}
    if emb.grid_thw is not None:
        tensors["image_grid_thw"] = torch.tensor([list(emb.grid_thw)], dtype=torch.long)
    meta = {**emb.meta, "format": FORMAT, "family": emb.family, "n": str(emb.n), "m": str(emb.m)}
    with staged_file(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    return Path(path)


def load_embeds(path: str | os.PathLike) -> ImageEmbeds:
    """Reads a file written by `save_embeds`.

    Raises:
        ValueError: not such a file (names the path and what is missing or wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such embeddings file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT or "image_embeds" not in keys:
        raise ValueError(
            f"{path}: format={meta.get('format')!r}, tensors {sorted(keys)}; expected format "
            f"{FORMAT!r} with 'image_embeds'"
        )
    grid = tensors.get("image_grid_thw")
    family = meta.pop("family", "")
    n = int(meta.pop("n", tensors["image_embeds"].shape[0]))
    for key in ("format", "m"):
        meta.pop(key, None)
    return ImageEmbeds(
        embeds=tensors["image_embeds"],
        family=family,
        n=n,
        grid_thw=None if grid is None else tuple(int(v) for v in grid.reshape(-1).tolist()),
        meta=meta,
    )
