"""Per-arch and per-cell overrides of the ``train:`` recipe (``train.overrides`` in params.yaml).

One shared recipe does not always serve every cell (a 7-token Qwen cell at rate 0.9 is not a
128-token LLaVA cell at 0.5). ``train.overrides`` maps ``<arch>`` or ``<arch>@<rate>`` to a
subset of the ``train`` keys; a cell's recipe is the shared one, then its arch's override, then
its cell's::

    train:
      lr: 0.02
      overrides:
        tiny-qwen2-vl: {epochs: 40}
        "tiny-qwen2-vl@0.9": {lr: 0.01}

Every override is validated before any compute: the key must name a known arch (and a rate in
(0, 1)), its keys must be ``train`` keys, and the merged recipe must validate as a whole. Keys
need not be cells of the current grid (a smoke grid keeps the default grid's overrides).
Overrides come with the validation-split sweep that justifies them (see the params comment).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from pydantic import Field, model_validator

from mc_core.training.config import TrainConfig

__all__ = ["TrainParams", "cell_key_of", "parse_key"]


def parse_key(key: str) -> tuple[str, float | None]:
    """``"arch"`` -> (arch, None); ``"arch@0.9"`` -> (arch, 0.9). ValueError on a bad rate."""
    arch, sep, rate = key.partition("@")
    if not arch:
        raise ValueError(f"{key!r}: expected '<arch>' or '<arch>@<rate>'")
    if not sep:
        return arch, None
    try:
        value = float(rate)
    except ValueError:
        raise ValueError(f"{key!r}: rate {rate!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"{key!r}: rate {rate!r} must be in (0, 1)")
    return arch, value


def cell_key_of(arch: str, rate: float) -> str:
    """The override key of one cell, ``<arch>@<rate>`` (the rate as DVC writes it)."""
    return f"{arch}@{float(rate)!r}"


MODEL_NAMES: ContextVar[tuple[str, ...]] = ContextVar("model_names", default=())


def _known_archs() -> list[str]:
    from mc_core.models import zoo

    return sorted(set(getattr(zoo, "TINY", {})) | set(getattr(zoo, "REAL", {})))


class TrainParams(TrainConfig):
    """``train:`` = ``mc_core.training.config.TrainConfig`` plus two pipeline keys.

    Attributes:
        overrides: per-arch / per-cell changes of the recipe (module docstring).
        seeds: compressors trained per cell, with seeds ``seed, seed + 1, ...``; the first is
            the cell's compressor (registered), the others go to
            ``models/compressors/<arch>-r<rate>-seeds/`` and their test accuracy is reported as
            mean +- sd beside it (the ``full`` profile uses 3).
    """

    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _overrides(self) -> TrainParams:
        fields = set(TrainConfig.model_fields)
        base = self.shared()
        known = None
        # Names of params.yaml's `models` section are archs too (set by tasks.params.validate;
        # TrainConfig's own __init__ keeps pydantic's validation context from reaching here).
        models = MODEL_NAMES.get()
        for key, change in self.overrides.items():
            where = f"overrides.{key}"
            try:
                arch, _ = parse_key(key)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            known = known if known is not None else sorted({*_known_archs(), *models})
            if arch not in known:
                raise ValueError(f"{where}: unknown arch {arch!r}; known: {', '.join(known)}")
            if not isinstance(change, Mapping) or not change:
                raise ValueError(f"{where}: expected a non-empty mapping of train keys")
            unknown = sorted(set(change) - fields)
            if unknown:
                raise ValueError(f"{where}: {unknown} are not train keys (known: {sorted(fields)})")
            try:
                TrainConfig(**{**base, **change})
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        return self

    def shared(self) -> dict[str, Any]:
        """The shared recipe (every key but the pipeline's ``overrides`` and ``seeds``)."""
        return self.model_dump(exclude={"overrides", "seeds"})

    def for_cell(self, arch: str, rate: float) -> TrainConfig:
        """The recipe of cell (arch, rate): shared, then ``<arch>``, then ``<arch>@<rate>``."""
        merged = self.shared()
        merged.update(self.overrides.get(arch, {}))
        for key, change in self.overrides.items():
            a, r = parse_key(key)
            if a == arch and r is not None and abs(r - float(rate)) < 1e-9:
                merged.update(change)
        return TrainConfig(**merged)

    def applied(self, arch: str, rate: float) -> dict[str, Any]:
        """What the overrides change for this cell (empty: the shared recipe), for the logs."""
        shared, cell = self.shared(), self.for_cell(arch, rate).model_dump()
        return {k: v for k, v in cell.items() if shared.get(k) != v}
