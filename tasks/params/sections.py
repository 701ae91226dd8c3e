"""The pipeline-only sections of ``params.yaml``: the grid, the data, evaluation, registry,
tracking and the report (the recipe sections are ``tasks.params.recipes``; world is the
library's ``WorldConfig``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mc_core.evaluation.config import EvalConfig
from mc_core.training.config import Section
from mc_registry import ANY_NAME_TEMPLATE, NAME_TEMPLATE, check_template, model_name
from tasks import cells
from tasks.params.archs import SAFE_NAME, known_archs, unsafe_arch

__all__ = [
    "CeilingsParams",
    "DataParams",
    "EvaluateParams",
    "GridParams",
    "RegisterParams",
    "ReportParams",
    "SplitParams",
    "TrackingParams",
]


def _known_methods() -> list[str]:
    from mc_core.compressors import available

    return available()


class GridParams(Section):
    """The cells: every (arch, rate) pair gets its own compressor, evaluation and registry entry.

    ``any_rate_archs`` (a subset of ``archs``; empty: none) also get one compressor each trained
    over ``train.any_rate.rates`` (stages ``train-any@``, ``evaluate-any@``, ``register-any@``),
    evaluated at every rate of ``rates`` and ``probe_rates`` (rates no cell trains at, where it
    meets the prompt-agnostic heuristics).
    """

    archs: list[str] = Field(min_length=1)
    rates: list[float] = Field(min_length=1)
    any_rate_archs: list[str] = Field(default_factory=list)
    probe_rates: list[float] = Field(default_factory=list)

    @field_validator("archs")
    @classmethod
    def _archs(cls, archs: list[str], info: ValidationInfo) -> list[str]:
        if len(set(archs)) != len(archs):
            raise ValueError(f"duplicate archs in {archs}")
        # The raw `models` section (validate() passes it): its names are archs too.
        models = (info.context or {}).get("models") or {}
        known = known_archs(models)
        for i, arch in enumerate(archs):
            # Raised per element so the message names the index.
            if not (isinstance(arch, str) and SAFE_NAME.match(arch)):
                raise unsafe_arch(i, archs, models)
            if arch not in known:
                raise ValueError(
                    f"[{i}]={arch!r}: unknown arch; known: {', '.join(known)}; for a checkpoint "
                    f"of your own add `models: {{{arch}: {{source: <HF id or folder>}}}}`"
                )
        return archs

    @field_validator("rates", "probe_rates", mode="before")
    @classmethod
    def _rates(cls, rates: Any) -> Any:
        if isinstance(rates, list):
            for i, rate in enumerate(rates):
                cells.check_rate(rate, f"[{i}]")  # "grid.rates[i]=..." once formatted
            if len({float(r) for r in rates}) != len(rates):
                raise ValueError(f"duplicate rates in {rates}")
        return rates

    @model_validator(mode="after")
    def _any_rate(self) -> GridParams:
        for i, arch in enumerate(self.any_rate_archs):
            if arch not in self.archs:
                raise ValueError(
                    f"any_rate_archs[{i}]={arch!r} is not in grid.archs {self.archs}: an "
                    "any-rate compressor is compared with its arch's cells (list archs of "
                    "grid.archs there, or [] for none)"
                )
        if len(set(self.any_rate_archs)) != len(self.any_rate_archs):
            raise ValueError(f"duplicate archs in any_rate_archs {self.any_rate_archs}")
        both = sorted(set(self.probe_rates) & set(self.rates))
        if both:
            raise ValueError(
                f"probe_rates {both} are grid.rates already: probe rates are the rates no "
                "cell trains at"
            )
        return self

    def cells(self) -> list[tuple[str, float]]:
        """Every (arch, rate) in matrix order (archs outer, rates inner, like DVC's matrix)."""
        return [(a, r) for a in self.archs for r in self.rates]

    def any_rates(self) -> list[float]:
        """Where an any-rate compressor is evaluated: ``rates`` and ``probe_rates``, ascending."""
        return sorted({*self.rates, *self.probe_rates})


class SplitParams(Section):
    """One dataset split: the embedded synthetic world or a real benchmark from local files.

    ``synthetic`` needs ``dialogues``; ``gqa`` needs ``questions`` and ``images``; ``vqav2``
    also ``annotations`` (and ``split`` when the questions file lacks ``data_subtype``);
    ``dataset`` needs ``path``, a ``save_to_disk`` folder in the dialogue schema (docs/data.md).
    For real sources ``dialogues`` is a seeded subset size (null: every dialogue).
    """

    source: Literal["synthetic", "gqa", "vqav2", "dataset"] = "synthetic"
    dialogues: int | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    questions: str | None = None
    annotations: str | None = None
    images: str | None = None
    split: str | None = None
    path: str | None = None  # source: dataset

    @model_validator(mode="after")
    def _needs(self) -> SplitParams:
        need = {
            "synthetic": ("dialogues",),
            "gqa": ("questions", "images"),
            "vqav2": ("questions", "annotations", "images"),
            "dataset": ("path",),
        }[self.source]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"source {self.source!r} needs {missing}")
        if self.source == "dataset":
            # A folder carries its own images and answers: a benchmark key here is a mistake.
            stray = [k for k in ("questions", "annotations", "images", "split") if getattr(self, k)]
            if stray:
                raise ValueError(f"source 'dataset' takes path, dialogues, seed; not {stray}")
        elif self.path is not None:
            raise ValueError(f"path applies to source 'dataset', not {self.source!r}")
        return self


class DataParams(Section):
    """What ``tasks.prepare`` writes to ``data/train``, ``data/val`` and ``data/test``.

    ``val`` (optional) is where recipes are tuned and the registry's champion is chosen, so
    the test split stays unseen by every choice; give it its own seed.
    """

    train: SplitParams
    val: SplitParams | None = None
    test: SplitParams

    @model_validator(mode="after")
    def _distinct(self) -> DataParams:
        if self.val is not None and self.val.source == "synthetic":
            for name in ("train", "test"):
                other = getattr(self, name)
                if other.source == "synthetic" and other.seed == self.val.seed:
                    raise ValueError(
                        f"val.seed={self.val.seed} equals {name}.seed: the "
                        "validation dialogues would repeat that split's"
                    )
        return self


class CeilingsParams(Section):
    """``evaluate.ceilings``: the selector and oracle ceilings beside every cell
    (``mc_core.evaluation.ceilings``). The oracle fits one P per dialogue on ``oracle_dialogues``
    seeded
    test dialogues, ``oracle_steps`` Adam steps each."""

    enabled: bool = True
    oracle_dialogues: int = Field(16, gt=0)
    oracle_steps: int = Field(100, gt=0)
    oracle_lr: float = Field(0.1, gt=0)
    oracle_eps: float = Field(0.01, ge=0)


class EvaluateParams(EvalConfig):
    """Which methods are compared in every cell and on how many held-out dialogues; how they
    are run is the library's `EvalConfig` (history, max_dialogues, device, batch_size,
    max_new_tokens, seed, progress)."""

    methods: list[str] = Field(min_length=1)
    # Evaluated on data/val beside train.method (and the registry's champion), for the gate.
    val_methods: list[str] = Field(default_factory=lambda: ["sample"])
    # The prompt-agnostic heuristics met by the any-rate compressors at grid.probe_rates, on
    # data/val (where the best is chosen) and data/test (null: every one of `methods`).
    probe_methods: list[str] | None = None
    ceilings: CeilingsParams = CeilingsParams()

    @field_validator("methods", "val_methods", "probe_methods")
    @classmethod
    def _methods(cls, methods: list[str] | None, info: ValidationInfo) -> list[str] | None:
        from mc_core.compressors import prompt_agnostic

        known = _known_methods()
        for i, m in enumerate(methods or []):
            if m not in known:
                raise ValueError(f"[{i}]={m!r}: unknown method; available: {', '.join(known)}")
            if info.field_name == "probe_methods" and not prompt_agnostic([m]):
                raise ValueError(
                    f"[{i}]={m!r}: not a prompt-agnostic heuristic (trained, the full model, "
                    "or prompt-dependent); probe rates compare the any-rate compressor with "
                    "those"
                )
        return methods

    def probe_heuristics(self) -> list[str]:
        """The heuristics evaluated at the probe rates: ``probe_methods``, or every
        prompt-agnostic heuristic of ``methods``."""
        from mc_core.compressors import prompt_agnostic

        if self.probe_methods is not None:
            return list(self.probe_methods)
        return prompt_agnostic(self.methods)


class RegisterParams(Section):
    """Registry naming and the evaluation metric that picks the ``champion`` version.

    ``name_template`` may use ``{method}`` (``train.method``), ``{arch}`` and ``{rate}``.
    """

    name_template: str = NAME_TEMPLATE
    # The registered model of an arch's any-rate compressor (``{method}``, ``{arch}``).
    any_name_template: str = ANY_NAME_TEMPLATE
    champion_metric: Literal["acc_avg", "kl_to_full"] = "acc_avg"
    # Gate (needs data.val): a new version takes the champion alias only if, on data/val, it
    # beats `gate_baseline` and the current champion by champion_metric.
    gate: bool = True
    gate_baseline: str = "sample"

    @field_validator("name_template")
    @classmethod
    def _template(cls, t: str) -> str:
        return check_template(t)

    @field_validator("any_name_template")
    @classmethod
    def _any_template(cls, t: str) -> str:
        return check_template(t, rate=False)

    def model_name(self, arch: str, rate: float | str, method: str = "metacompress") -> str:
        """Registered model name of one cell, e.g. ``metacompress-tiny-llava-r0.9``; of the
        arch's any-rate compressor (``rate`` ``cells.ANY``), ``metacompress-tiny-llava-any``."""
        if rate == cells.ANY:
            return self.any_name_template.format(method=method, arch=arch)
        return model_name(arch, rate, method, self.name_template)


class TrackingParams(Section):
    """MLflow experiment; the tracking URI comes from ``MLFLOW_TRACKING_URI`` or the checkout."""

    experiment: str = Field("metacompress", min_length=1)


class ReportParams(Section):
    """The summary table and plots over every cell."""

    methods: list[str] = Field(min_length=1)
    dpi: int = Field(120, gt=0)
