"""The whole ``params.yaml``: its sections, their validation, and the stages' view of them.

Every stage reads params.yaml through :func:`load`, which validates the whole file first, so a
bad value stops every stage before it touches a model and the error names the key; a stage then
sees only the sections it declares (:class:`SectionView`, kept equal to ``dvc.yaml``'s
``params:`` lists by tests/test_config.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mc_core.data.synthetic import WorldConfig
from mc_core.training.config import Section, format_errors
from tasks import cells
from tasks.params.archs import MODEL_NAMES, SAFE_NAME, ModelSource, slug
from tasks.params.recipes import BaseParams, TrainParams
from tasks.params.sections import (
    DataParams,
    EvaluateParams,
    GridParams,
    RegisterParams,
    ReportParams,
    TrackingParams,
)

__all__ = [
    "DEFAULT_PATH",
    "SECTIONS",
    "Params",
    "SectionView",
    "load",
    "main",
    "read_yaml",
    "validate",
]

DEFAULT_PATH = "params.yaml"
SECTIONS = (
    "grid",
    "models",
    "data",
    "world",
    "base",
    "train",
    "evaluate",
    "register",
    "tracking",
    "report",
)


class Params(Section):
    """The whole ``params.yaml``."""

    grid: GridParams
    # Names of real base models (usable in grid.archs) -> their HF id or local folder.
    models: dict[str, ModelSource] = Field(default_factory=dict)
    data: DataParams
    world: WorldConfig = Field(default_factory=WorldConfig)
    base: BaseParams = Field(default_factory=BaseParams)
    train: TrainParams
    evaluate: EvaluateParams
    # "register" would shadow pydantic's BaseModel.register: stored as register_, read as
    # params.yaml's "register" (SectionView maps the name).
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    tracking: TrackingParams = TrackingParams()
    report: ReportParams

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelSource]) -> dict[str, ModelSource]:
        from mc_core.models import zoo

        for name, spec in models.items():
            if not SAFE_NAME.match(name):
                try:
                    fix = f"e.g. {slug(name)!r}"
                except ValueError:
                    fix = "lowercase letters, digits, '.', '_' and '-'"
                raise ValueError(
                    f"name {name!r} is not a safe arch name (stage names and paths are built "
                    f"from it): use {fix}"
                )
            if name in zoo.TINY:
                raise ValueError(
                    f"name {name!r} is a tiny architecture (trained by tasks.base, not "
                    f"loaded from {spec.source!r}): choose another name"
                )
        return models

    @model_validator(mode="after")
    def _across(self) -> Params:
        # The registry ranks versions by the trained method's evaluation: it must be evaluated.
        if self.train.method not in self.evaluate.methods:
            raise ValueError(
                f"evaluate.methods={self.evaluate.methods!r}: must include "
                f"train.method={self.train.method!r} (the registry ranks by it)"
            )
        gate = self.register_
        if (
            gate.gate
            and self.data.val is not None
            and (gate.gate_baseline not in self.evaluate.val_methods)
        ):
            raise ValueError(
                f"register.gate_baseline={gate.gate_baseline!r} must be in "
                f"evaluate.val_methods={self.evaluate.val_methods!r}"
            )
        if self.grid.any_rate_archs and not self.train.any_rate:
            raise ValueError(
                f"grid.any_rate_archs={self.grid.any_rate_archs!r}: train.any_rate is empty; "
                "give the any-rate compressors' rates (train.any_rate.rates)"
            )
        if self.grid.any_rate_archs:
            # It is compared with the per-rate compressor at every grid rate: it must serve them.
            span = (min(self.train.any_rate["rates"]), max(self.train.any_rate["rates"]))
            out = [r for r in self.grid.rates if not span[0] <= r <= span[1]]
            if out:
                raise ValueError(
                    f"train.any_rate.rates={self.train.any_rate['rates']!r} spans "
                    f"[{span[0]}, {span[1]}], which misses grid.rates {out}: the any-rate "
                    "compressors are compared with the cells at every grid rate"
                )
        extra = set(self.report.methods) - set(self.evaluate.methods)
        if extra:
            raise ValueError(
                f"report.methods={self.report.methods!r}: {sorted(extra)} not in evaluate.methods"
            )
        return self


def validate(raw: Mapping[str, Any], *, source: str = DEFAULT_PATH) -> Params:
    """Validate a parsed params mapping; ValueError names ``source`` and every bad key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    models = raw.get("models")
    models = models if isinstance(models, Mapping) else {}
    # The `models` names are archs for grid.archs and the recipe sections' overrides.
    token = MODEL_NAMES.set(tuple(str(k) for k in models))
    try:
        return Params.model_validate(dict(raw), context={"models": models})
    except ValidationError as err:
        raise ValueError(format_errors(err, source=source)) from None
    finally:
        MODEL_NAMES.reset(token)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML params file; ValueError names the file on a syntax error."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: params file not found (run from the checkout)") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    return raw if raw is not None else {}


class SectionView:
    """Read access to the sections a stage declares; any other section is an error.

    This is how ``dvc.yaml``'s ``params:`` list of a stage is kept equal to what its task reads:
    a task that touches an undeclared section fails at once (and the tests compare the lists).
    """

    def __init__(self, params: Params, sections: Iterable[str], *, who: str):
        self._params = params
        self._sections = frozenset(sections)
        self._who = who
        unknown = self._sections - set(SECTIONS)
        if unknown:
            raise ValueError(f"{who}: unknown params sections {sorted(unknown)}; known: {SECTIONS}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._sections:
            raise AttributeError(
                f"{self._who} reads params section {name!r} but declares only "
                f"{sorted(self._sections)} (keep dvc.yaml params in sync)"
            )
        return getattr(self._params, "register_" if name == "register" else name)

    @property
    def declared(self) -> frozenset[str]:
        """The sections this view exposes."""
        return self._sections


def load(
    path: str | Path = DEFAULT_PATH, *, sections: Iterable[str] | None = None, who: str = "caller"
) -> Params | SectionView:
    """Validate the whole params file, then return it (or a view of the declared ``sections``)."""
    try:
        params = validate(read_yaml(path), source=str(path))
    except ValueError as err:
        raise ValueError(
            f"{err}\nFix {path}, then check it with: python -m tasks.params {path}"
        ) from None
    return params if sections is None else SectionView(params, sections, who=who)


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.params [path]``: validate the params file, print its cells."""
    argv = sys.argv[1:] if argv is None else argv
    p = load(argv[0] if argv else DEFAULT_PATH)
    assert isinstance(p, Params)
    print("\n".join(cells.cell_key(a, r) for a, r in p.grid.cells()))
