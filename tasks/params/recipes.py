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
    """``train:`` = ``TrainConfig`` plus three pipeline keys.

    Attributes:
        overrides: per-arch (``<arch>``) / per-cell (``<arch>@<rate>``) changes of the recipe.
        seeds: compressors trained per cell, with seeds ``seed, seed + 1, ...``; the first is
            the cell's compressor (registered), the others go to
            ``models/compressors/<arch>-r<rate>-seeds/`` and their test accuracy is reported as
            mean +- sd beside it (the ``full`` profile uses 3).
        any_rate: the recipe of the any-rate compressors (``grid.any_rate_archs``): changes of
            the keys above, ``rates`` among them (``[lo, hi]`` or three or more rates;
            ``mc_core.training.rates``), applied after the arch's override. The shared
            ``rates`` stays null: a cell trains at its own rate.
    """

    OVERRIDES: ClassVar[ovr.Overrides] = ovr.Overrides(
        section="train",
        field="overrides",
        build=lambda d: TrainConfig(**d),
        keys=frozenset(TrainConfig.model_fields),
        per_cell=True,
        pipeline_keys=frozenset({"seeds", "any_rate"}),
    )

    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: int = Field(1, ge=1)
    any_rate: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_overrides(self) -> TrainParams:
        ovr.check(self, self.OVERRIDES)
        if self.rates is not None:
            raise ValueError(
                f"rates={self.rates!r}: a cell trains at its own rate; the rates of the "
                "any-rate compressors go in train.any_rate.rates"
            )
        for key, change in self.overrides.items():
            if change.get("rates") is not None:
                raise ValueError(
                    f"overrides.{key}.rates: a cell trains at its own rate; the rates of the "
                    "any-rate compressors go in train.any_rate.rates"
                )
        if self.any_rate:
            unknown = sorted(set(self.any_rate) - self.OVERRIDES.keys)
            if unknown:
                raise ValueError(
                    f"any_rate.{unknown[0]}: not a train key (known: "
                    f"{', '.join(sorted(self.OVERRIDES.keys))})"
                )
            if self.any_rate.get("rates") is None:
                raise ValueError(
                    "any_rate.rates: missing; give the rates to train over, [lo, hi] or three "
                    "or more rates"
                )
            try:
                TrainConfig(**{**ovr.shared(self, self.OVERRIDES), **self.any_rate})
            except ValueError as err:  # "train.<key>=...: why" -> "any_rate.<key>=...: why"
                msg = str(err)
                msg = msg.removeprefix("train.") if msg.startswith("train.") else f": {msg}"
                raise ValueError(f"any_rate.{msg}".replace("any_rate.: ", "any_rate: ")) from None
        return self

    def for_any(self, arch: str) -> TrainConfig:
        """The recipe of ``arch``'s any-rate compressor: shared, then ``<arch>``, then
        ``any_rate``.

        Raises:
            ValueError: ``train.any_rate`` is empty (no rates to train over).
        """
        if not self.any_rate:
            raise ValueError(
                "train.any_rate: empty; an any-rate compressor needs at least its rates "
                "(train.any_rate.rates: [lo, hi] or three or more rates)"
            )
        merged = ovr.recipe_for(self, self.OVERRIDES, arch).model_dump()
        return TrainConfig(**{**merged, **self.any_rate})

    def shared(self) -> dict[str, Any]:
        """The shared recipe (every key but the pipeline's ``overrides`` and ``seeds``)."""
        return ovr.shared(self, self.OVERRIDES)

    def for_cell(self, arch: str, rate: float) -> TrainConfig:
        """The recipe of cell (arch, rate): shared, then ``<arch>``, then ``<arch>@<rate>``."""
        return ovr.recipe_for(self, self.OVERRIDES, arch, rate)

    def applied(self, arch: str, rate: float) -> dict[str, Any]:
        """What the overrides change for this cell (empty: the shared recipe), for the logs."""
        return ovr.applied(self, self.OVERRIDES, arch, rate)
