"""The resumable training state: one object, saved atomically, loaded without unpickling."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mc_core import io as mc_io

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Where a teacher run stands. ``recipe`` fingerprints the run: a checkpoint of another
    recipe or architecture is ignored (training starts over) rather than resumed."""

    arch: str
    recipe: str  # JSON of the config, the world and the model sizes
    stage: int = 1
    step: int = 0
    curve: list[list[float]] = field(default_factory=list)  # [stage, step, held-out acc]
    model: dict | None = None
    aids: dict | None = None
    opt: dict | None = None  # the current stage's optimiser (None at a stage start)

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        torch.save(asdict(self), buf)
        mc_io.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, arch: str, recipe: str) -> TrainState | None:
        """The state saved at ``path`` when it belongs to this run, else None."""
        if not path.is_file():
            return None
        d = torch.load(path, weights_only=True)
        if d.get("arch") != arch or d.get("recipe") != recipe:
            return None
        return cls(**d)

    @staticmethod
    def fingerprint(*parts: dict) -> str:
        return json.dumps(parts, sort_keys=True, default=str)
