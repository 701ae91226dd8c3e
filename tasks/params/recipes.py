"""The recipe sections, ``base`` and ``train``: the library's configs plus their overrides.

``base`` is ``mc_core.training.teacher.TeacherConfig`` (the tiny teachers, per arch) and
``train`` is ``mc_core.training.config.TrainConfig`` (the compressors, per cell), each with its
per-arch (and, for ``train``, per-cell) overrides validated and applied by
``tasks.params.overrides`` (the same rules for both).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from mc_core.training.config import TrainConfig
from mc_core.training.teacher import TeacherConfig
from tasks.params import overrides as ovr

__all__ = ["BaseParams", "TrainParams"]


class BaseParams(TeacherConfig):
    """``base:`` = ``TeacherConfig``; ``arch_overrides`` maps ``<arch>`` to changes of its keys.

    ``for_arch`` (which ``mc_core.training.teacher`` calls too) applies them through
    ``tasks.params.overrides``, so they follow the same rules as ``train.overrides``.
    """

    OVERRIDES: ClassVar[ovr.Overrides] = ovr.Overrides(
        section="base",
        field="arch_overrides",
        build=lambda d: TeacherConfig.from_dict(d, where="base"),
        keys=frozenset(TeacherConfig.model_fields) - {"arch_overrides"},
        per_cell=False,
    )

    # Replaces TeacherConfig's own check of the overrides (same name): `_check_overrides` does
    # it the pipeline's way, as for train.
    @field_validator("arch_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return v

    @model_validator(mode="after")
    def _check_overrides(self) -> BaseParams:
        ovr.check(self, self.OVERRIDES)
        return self

    def for_arch(self, arch: str) -> TeacherConfig:
        """The teacher recipe of ``arch``: shared, then ``arch_overrides[arch]``."""
        return ovr.recipe_for(self, self.OVERRIDES, arch)

    def applied(self, arch: str) -> dict[str, Any]:
        """What the overrides change for ``arch`` (empty: the shared recipe)."""
        return ovr.applied(self, self.OVERRIDES, arch)


class TrainParams(TrainConfig):
    """``train:`` = ``TrainConfig`` plus two pipeline keys.

    Attributes:
        overrides: per-arch (``<arch>``) / per-cell (``<arch>@<rate>``) changes of the recipe.
        seeds: compressors trained per cell, with seeds ``seed, seed + 1, ...``; the first is
            the cell's compressor (registered), the others go to
            ``models/compressors/<arch>-r<rate>-seeds/`` and their test accuracy is reported as
            mean +- sd beside it (the ``full`` profile uses 3).
    """

    OVERRIDES: ClassVar[ovr.Overrides] = ovr.Overrides(
        section="train",
        field="overrides",
        build=lambda d: TrainConfig(**d),
        keys=frozenset(TrainConfig.model_fields),
        per_cell=True,
        pipeline_keys=frozenset({"seeds"}),
    )

    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_overrides(self) -> TrainParams:
        ovr.check(self, self.OVERRIDES)
        return self

    def shared(self) -> dict[str, Any]:
        """The shared recipe (every key but the pipeline's ``overrides`` and ``seeds``)."""
        return ovr.shared(self, self.OVERRIDES)

    def for_cell(self, arch: str, rate: float) -> TrainConfig:
        """The recipe of cell (arch, rate): shared, then ``<arch>``, then ``<arch>@<rate>``."""
        return ovr.recipe_for(self, self.OVERRIDES, arch, rate)

    def applied(self, arch: str, rate: float) -> dict[str, Any]:
        """What the overrides change for this cell (empty: the shared recipe), for the logs."""
        return ovr.applied(self, self.OVERRIDES, arch, rate)
