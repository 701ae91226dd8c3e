"""The pipeline's ``params.yaml``: one typed model per section, validated before any compute.

``params.yaml`` is the single source of every hyper-parameter and of the grid of cells
(architecture x reduction rate). DVC tracks its keys; the stage entry points read it only
through :func:`load`, which validates the whole file first, so a bad value stops every stage
before it touches a model and the error names the key, e.g.::

    params.yaml: grid.rates[1]=1.5: rate must be in (0, 1)

Sections: ``grid`` (the cells), ``models`` (where real base models come from: a name per HF id
or local folder, so ``grid.archs`` holds only filesystem-safe names), ``data`` (what
``tasks.prepare`` builds), ``world``
(``mc_core.data.synthetic.WorldConfig``), ``base`` (``mc_core.training.teacher.TeacherConfig``),
``train`` (``mc_core.training.config.TrainConfig``), ``evaluate``, ``register``, ``tracking`` and
``report``. The library's own configs are used as they are; the pipeline-only sections live here.

Profiles are named overlays on the committed ``params.yaml`` (which *is* the ``default``
profile): ``smoke`` (a tiny grid, a few steps; the whole DAG in minutes) and ``full`` (every
tiny base model). :func:`profile_params` applies one; the pipeline runs non-default profiles in
their own workspace (see ``flows/workspace.py``) so the default outputs are never overwritten.

``python -m tasks.params [path]`` validates a params file and prints its cells.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from mc_core import io
from mc_core.data.synthetic import WorldConfig
from mc_core.training.config import Section, format_errors
from mc_core.training.teacher import TeacherConfig
from tasks.overrides import MODEL_NAMES, TrainParams

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
# An arch name: DVC builds stage names (base@<arch>) and output paths from it, MLflow model
# names too. Lowercase so two names never collide on a case-insensitive filesystem.
SAFE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


def format_rate(rate: float) -> str:
    """The rate as it appears in stage names and paths (``0.5`` -> ``"0.5"``), like DVC's matrix."""
    return repr(float(rate))


def cell_key(arch: str, rate: float) -> str:
    """The DVC matrix key of one cell: ``<arch>-<rate>`` (stage ``train@<arch>-<rate>``)."""
    return f"{arch}-{format_rate(rate)}"


def check_rate(rate: float) -> float:
    """``rate`` as a float, or ValueError unless it is a number in (0, 1)."""
    if not (isinstance(rate, int | float) and math.isfinite(rate) and 0.0 < rate < 1.0):
        raise ValueError("rate must be in (0, 1)")
    return float(rate)


def known_archs(models: Iterable[str] = ()) -> list[str]:
    """Architectures ``mc_core.models.zoo`` can build (tiny) or load (real), plus ``models``
    names."""
    from mc_core.models import zoo

    return sorted(set(getattr(zoo, "TINY", {})) | set(getattr(zoo, "REAL", {})) | set(models))


def slug(value: str) -> str:
    """A readable arch name for an HF id or a folder: its last path part, lowercased, every run
    of other characters turned into ``-`` (``llava-hf/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``,
    ``/data/ckpt/Qwen2-VL/`` -> ``qwen2-vl``).

    Raises:
        ValueError: nothing usable is left (names the value).
    """
    last = str(value).replace("\\", "/").rstrip("/").rpartition("/")[2].lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", last)
    name = re.sub(r"-{2,}", "-", name).strip("-._")[:64].strip("-._")
    if not SAFE_NAME.match(name):
        raise ValueError(f"{value!r}: no readable name can be made of it; choose one yourself")
    return name


def slugs(values: Iterable[str], *, taken: Iterable[str] = ()) -> dict[str, str]:
    """:func:`slug` of each value; ValueError when two values (or a value and a ``taken``
    name) would get the same name."""
    out: dict[str, str] = {}
    owner = {name: None for name in taken}
    for value in values:
        name = slug(value)
        if name in owner:
            other = "an existing arch" if owner[name] is None else repr(owner[name])
            raise ValueError(
                f"{value!r} and {other} would both be named {name!r}: choose distinct names"
            )
        owner[name] = value
        out[value] = name
    return out


def _unsafe_arch(i: int, archs: list[Any], models: Mapping[str, Any]) -> ValueError:
    """The error for ``archs[i]``, an HF id or a path rather than a name, with the exact fix."""
    arch = archs[i]
    head = f"[{i}]={arch!r}: grid.archs holds names (DVC builds stage names and paths from them)"
    named = [k for k, v in models.items() if isinstance(v, Mapping) and v.get("source") == arch]
    if named:
        return ValueError(f"{head}; models.{named[0]} has this source: put {named[0]!r} there")
    # Every such entry at once, so the suggested names do not collide with each other.
    unsafe = [str(a) for a in archs if not (isinstance(a, str) and SAFE_NAME.match(a))]
    try:
        name = slugs(unsafe, taken=set(known_archs(models)))[str(arch)]
    except ValueError as err:
        return ValueError(
            f"{head}, not HF ids or paths; {err}: add `models: {{<name>: {{source: '{arch}'}}}}` "
            "and put that <name> in grid.archs"
        )
    return ValueError(
        f"{head}, not HF ids or paths. Fix: add to params.yaml "
        f"`models: {{{name}: {{source: '{arch}'}}}}` and put `{name}` in grid.archs"
    )


def _known_methods() -> list[str]:
    from mc_core.compressors import available

    return available()


class GridParams(Section):
    """The cells: every (arch, rate) pair gets its own compressor, evaluation and registry entry."""

    archs: list[str] = Field(min_length=1)
    rates: list[float] = Field(min_length=1)

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
                raise _unsafe_arch(i, archs, models)
            if arch not in known:
                raise ValueError(
                    f"[{i}]={arch!r}: unknown arch; known: {', '.join(known)}; for a checkpoint "
                    f"of your own add `models: {{{arch}: {{source: <HF id or folder>}}}}`"
                )
        return archs

    @field_validator("rates", mode="before")
    @classmethod
    def _rates(cls, rates: Any) -> Any:
        if isinstance(rates, list):
            for i, rate in enumerate(rates):
                try:
                    check_rate(rate)
                except ValueError as err:
                    raise ValueError(f"[{i}]={rate!r}: {err}") from None
            if len({float(r) for r in rates}) != len(rates):
                raise ValueError(f"duplicate rates in {rates}")
        return rates

    def cells(self) -> list[tuple[str, float]]:
        """Every (arch, rate) in matrix order (archs outer, rates inner, like DVC's matrix)."""
        return [(a, r) for a in self.archs for r in self.rates]


class ModelSource(Section):
    """``models.<name>``: where a real base model comes from.

    ``source`` is anything ``from_pretrained`` takes (an HF id, resolved through the
    Hugging Face cache, or a local folder); ``revision`` pins a branch, tag or commit of an
    HF id. ``tasks.base`` records the exact files (``mc_core.models.hub``).
    """

    source: str = Field(min_length=1)
    revision: str | None = Field(None, min_length=1)


def source_of(models: Mapping[str, ModelSource], arch: str) -> ModelSource | None:
    """Where a real arch comes from: ``models.<arch>``, else the built-in ``zoo.REAL`` id;
    None for a tiny arch (trained by ``tasks.base``)."""
    from mc_core.models import zoo

    if arch in models:
        return models[arch]
    if arch in zoo.REAL:
        return ModelSource(source=zoo.REAL[arch].hf_id)
    return None


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


class EvaluateParams(Section):
    """Which methods are compared in every cell and on how many held-out dialogues."""

    methods: list[str] = Field(min_length=1)
    history: Literal["model", "gold"] = "model"
    max_dialogues: int | None = Field(None, gt=0)
    device: str = "auto"
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(4, gt=0)
    seed: int = 0
    progress: bool = True
    # Evaluated on data/val beside train.method (and the registry's champion), for the gate.
    val_methods: list[str] = Field(default_factory=lambda: ["sample"])
    ceilings: CeilingsParams = CeilingsParams()

    def run_kwargs(self) -> dict[str, Any]:
        """The keywords every ``mc_core.evaluation.runner`` call of the pipeline takes from here
        (the
        cell, its seeds and ceilings, data/val, the base report); callers add
        ``max_dialogues`` and ``progress`` where they apply."""
        return {
            "history": self.history,
            "device": self.device,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }

    @field_validator("methods", "val_methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        known = _known_methods()
        for i, m in enumerate(methods):
            if m not in known:
                raise ValueError(f"[{i}]={m!r}: unknown method; available: {', '.join(known)}")
        return methods


class RegisterParams(Section):
    """Registry naming and the evaluation metric that picks the ``champion`` version.

    ``name_template`` may use ``{method}`` (``train.method``), ``{arch}`` and ``{rate}``.
    """

    name_template: str = "{method}-{arch}-r{rate}"
    champion_metric: Literal["acc_avg", "kl_to_full"] = "acc_avg"
    # Gate (needs data.val): a new version takes the champion alias only if, on data/val, it
    # beats `gate_baseline` and the current champion by champion_metric.
    gate: bool = True
    gate_baseline: str = "sample"

    @field_validator("name_template")
    @classmethod
    def _template(cls, t: str) -> str:
        if "{arch}" not in t or "{rate}" not in t:
            raise ValueError(f"{t!r} must contain {{arch}} and {{rate}}")
        return t

    def model_name(self, arch: str, rate: float, method: str = "metacompress") -> str:
        """Registered model name of one cell, e.g. ``metacompress-tiny-llava-r0.9``."""
        return self.name_template.format(method=method, arch=arch, rate=format_rate(rate))


class TrackingParams(Section):
    """MLflow experiment; the tracking URI comes from ``MLFLOW_TRACKING_URI`` or the checkout."""

    experiment: str = Field("metacompress", min_length=1)


class ReportParams(Section):
    """The summary table and plots over every cell."""

    methods: list[str] = Field(min_length=1)
    dpi: int = Field(120, gt=0)


class Params(Section):
    """The whole ``params.yaml``."""

    grid: GridParams
    # Names of real base models (usable in grid.archs) -> their HF id or local folder.
    models: dict[str, ModelSource] = Field(default_factory=dict)
    data: DataParams
    world: WorldConfig = Field(default_factory=WorldConfig)
    base: TeacherConfig = Field(default_factory=TeacherConfig)
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
    # The `models` names are archs for grid.archs and train.overrides.
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


# Profiles: overlays on the committed params.yaml (= "default"). Nested dicts merge; lists and
# scalars replace. Smoke keeps every stage of the DAG but shrinks each to seconds.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {
        "grid": {"archs": ["tiny-llava"], "rates": [0.5, 0.9]},
        "data": {"train": {"dialogues": 24}, "val": {"dialogues": 8}, "test": {"dialogues": 8}},
        "base": {
            "train_images": 32,
            "eval_dialogues": 8,
            "curve_dialogues": 8,
            "stage1_steps": 4,
            "stage2_steps": 4,
            "stage3_steps": 2,
            "stage3_bank": 8,
            "warmup_steps": 2,
            "curve_every": 1000,
        },
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 4, "log_every": 1},
        "evaluate": {
            "methods": ["none", "sample", "metacompress"],
            "max_dialogues": 8,
            "batch_size": 8,
            "ceilings": {"oracle_dialogues": 2, "oracle_steps": 3},
        },
        "report": {"methods": ["none", "sample", "metacompress"]},
        "tracking": {"experiment": "metacompress-smoke"},
    },
    "full": {
        "grid": {"archs": ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]},
        # Three seeds per cell: the summary reports the trained method's mean +- sd.
        "train": {"seeds": 3},
    },
}
ProfileName = Literal["default", "smoke", "full"]


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_params(
    name: str, base: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The params of profile ``name``: its overlay (then ``extra``) merged onto ``base``.

    ``base`` is normally the parsed ``params.yaml`` (so a smoke run inherits your real-model or
    real-data settings and only shrinks the work). Profiles live here, not in ``params.yaml``,
    so DVC sees one flat params file per workspace. The result is validated.
    """
    if name not in PROFILES:
        raise ValueError(f"profile={name!r}: unknown profile; known: {', '.join(PROFILES)}")
    merged = _merge(dict(base), PROFILES[name])
    if extra:
        merged = _merge(merged, extra)
    validate(merged, source=f"profile {name!r}")
    return merged


def dump_yaml(params: Mapping[str, Any], path: str | Path, *, header: str = "") -> Path:
    """Write a params mapping as YAML atomically."""
    text = yaml.safe_dump(dict(params), sort_keys=False, default_flow_style=False)
    return io.write_text(path, header + text)


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.params [path]``: validate the params file, print its cells."""
    argv = sys.argv[1:] if argv is None else argv
    p = load(argv[0] if argv else DEFAULT_PATH)
    assert isinstance(p, Params)
    print("\n".join(cell_key(a, r) for a, r in p.grid.cells()))


if __name__ == "__main__":
    main()
