"""Typed models of the ``params.yaml`` sections, validated before any compute.

``params.yaml`` is the single source of every hyper-parameter and of the grid of cells
(architecture x reduction rate). DVC tracks its keys; the stage entry points in ``tasks/`` read
it only through :func:`load`, which validates the whole file first, so a bad value stops every
stage before it touches a model and the error names the key, e.g.::

    params.yaml: grid.rates[1]=1.5: rate must be in (0, 1)

Sections (one pydantic model each): ``grid`` (the cells), ``data`` (what ``tasks.prepare``
builds), ``world`` (knobs of the synthetic world), ``base`` (base models: tiny teachers or real
checkpoints), ``train`` (the compressor recipe), ``evaluate``, ``register``, ``tracking`` and
``report``.

Profiles are named overlays on the committed ``params.yaml`` (which *is* the ``default``
profile): ``smoke`` (a tiny grid, a few steps; the whole DAG in minutes) and ``full`` (every
tiny base model). :func:`profile_params` applies one; the pipeline runs non-default profiles in
their own workspace (see ``flows/workspace.py``) so the default outputs are never overwritten.

Cross-module names (architectures, compressor methods) are checked against the code that owns
them (``mc_core.zoo``, ``mc_core.compressors``) when those modules are importable.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PATH = "params.yaml"
SECTIONS = ("grid", "data", "world", "base", "train", "evaluate", "register", "tracking", "report")


class _Section(BaseModel):
    """Base of every section: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_rate(rate: float) -> str:
    """The rate as it appears in stage names and paths (``0.5`` -> ``"0.5"``), like DVC's matrix."""
    return repr(float(rate))


def cell_key(arch: str, rate: float) -> str:
    """The DVC matrix key of one cell: ``<arch>-<rate>`` (stage ``train@<arch>-<rate>``)."""
    return f"{arch}-{format_rate(rate)}"


def _check_rate(rate: float) -> float:
    if not (isinstance(rate, int | float) and math.isfinite(rate) and 0.0 < rate < 1.0):
        raise ValueError("rate must be in (0, 1)")
    return float(rate)


def known_archs() -> list[str]:
    """Architectures ``mc_core.zoo`` can build (tiny) or load (real).

    Read from the zoo's source (the literal keys of ``TINY`` and ``REAL``) unless the module is
    already imported: importing it loads transformers' model classes (~6 s), which stages that
    never touch a model (prepare, register, report) should not pay just to validate a name.
    """
    zoo = sys.modules.get("mc_core.zoo")
    if zoo is None:
        names = _literal_dict_keys("mc_core.zoo", ("TINY", "REAL"))
        if names is not None:
            return sorted(names)
        zoo = importlib.import_module("mc_core.zoo")
    return sorted(set(getattr(zoo, "TINY", {})) | set(getattr(zoo, "REAL", {})))


def _literal_dict_keys(module: str, names: tuple[str, ...]) -> set[str] | None:
    """String keys of module-level dict literals ``names`` (None when not all are literal)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ImportError(module)
    tree = ast.parse(Path(spec.origin).read_text())
    found: dict[str, set[str]] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in names and isinstance(node.value, ast.Dict):
            keys = node.value.keys
            if not all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in keys):
                return None
            found[target.id] = {k.value for k in keys}
    return set().union(*found.values()) if set(found) == set(names) else None


def _known_methods() -> list[str] | None:
    try:
        compressors = importlib.import_module("mc_core.compressors")
    except ImportError:  # the compressors package is optional for config-only tools
        return None
    return list(compressors.available())


class GridParams(_Section):
    """The cells: every (arch, rate) pair gets its own compressor, evaluation and registry entry."""

    archs: list[str] = Field(min_length=1)
    rates: list[float] = Field(min_length=1)

    @field_validator("archs")
    @classmethod
    def _archs(cls, archs: list[str]) -> list[str]:
        if len(set(archs)) != len(archs):
            raise ValueError(f"duplicate archs in {archs}")
        try:
            known = known_archs()
        except ImportError:  # zoo not importable: names are checked again by tasks.base
            return archs
        for i, arch in enumerate(archs):
            if arch not in known:
                # Raised per element so the message names the index.
                raise ValueError(f"[{i}]={arch!r}: unknown arch; known: {', '.join(known)}")
        return archs

    @field_validator("rates", mode="before")
    @classmethod
    def _rates(cls, rates: Any) -> Any:
        if isinstance(rates, list):
            for i, rate in enumerate(rates):
                try:
                    _check_rate(rate)
                except ValueError as err:
                    raise ValueError(f"[{i}]={rate!r}: {err}") from None
            if len({float(r) for r in rates}) != len(rates):
                raise ValueError(f"duplicate rates in {rates}")
        return rates

    def cells(self) -> list[tuple[str, float]]:
        """Every (arch, rate) in matrix order (archs outer, rates inner, like DVC's matrix)."""
        return [(a, r) for a in self.archs for r in self.rates]


class SplitParams(_Section):
    """One dataset split: the embedded synthetic world or a real benchmark from local files.

    ``synthetic`` needs ``dialogues``; ``gqa`` needs ``questions`` and ``images``; ``vqav2``
    also ``annotations`` (and ``split`` when the questions file lacks ``data_subtype``). For real
    sources ``dialogues`` is a seeded subset size (null: every dialogue).
    """

    source: Literal["synthetic", "gqa", "vqav2"] = "synthetic"
    dialogues: int | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    questions: str | None = None
    annotations: str | None = None
    images: str | None = None
    split: str | None = None

    @model_validator(mode="after")
    def _needs(self) -> SplitParams:
        need = {"synthetic": ("dialogues",), "gqa": ("questions", "images"),
                "vqav2": ("questions", "annotations", "images")}[self.source]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"source {self.source!r} needs {missing}")
        return self


class DataParams(_Section):
    """What ``tasks.prepare`` writes to ``data/train`` and ``data/test``."""

    train: SplitParams
    test: SplitParams


class TrainParams(_Section):
    """The compressor recipe: exactly the fields of ``mc_core.train.TrainConfig``.

    Defaults are the paper's (SGD lr 1e-3, clip 1e-2, 2 epochs, batch 36, lambdas 1); the tests
    check that this model and ``TrainConfig`` have the same fields and defaults.
    """

    method: str = "metacompress"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1e-2, gt=0)
    clip_mode: Literal["norm", "value"] = "norm"
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(36, gt=0)
    lambda_ent: float = Field(1.0, ge=0)
    lambda_col: float = Field(1.0, ge=0)
    d_c: int = Field(64, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = Field(None, gt=0)  # caps epochs (smoke profile)
    log_every: int = Field(10, gt=0)
    explode_factor: float = Field(100.0, gt=0)
    cache_teacher: bool = True
    teacher_batch: int = Field(16, gt=0)
    progress: bool = True

    def to_train_config(self):
        """The ``mc_core.train.TrainConfig`` of these params (which validates itself again)."""
        from mc_core.train import TrainConfig

        return TrainConfig(**self.model_dump())


class EvaluateParams(_Section):
    """Which methods are compared in every cell and on how many held-out dialogues."""

    methods: list[str] = Field(min_length=1)
    history: Literal["model", "gold"] = "model"
    max_dialogues: int | None = Field(None, gt=0)
    device: str = "auto"
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(4, gt=0)
    seed: int = 0
    progress: bool = True

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        known = _known_methods()
        if known is not None:
            for i, m in enumerate(methods):
                if m not in known:
                    raise ValueError(f"[{i}]={m!r}: unknown method; available: {', '.join(known)}")
        if "metacompress" not in methods:
            raise ValueError("must include 'metacompress' (the registry ranks by it)")
        return methods


class RegisterParams(_Section):
    """Registry naming and the evaluation metric that picks the ``champion`` version."""

    name_template: str = "metacompress-{arch}-r{rate}"
    champion_metric: Literal["acc_avg", "kl_to_full"] = "acc_avg"

    @field_validator("name_template")
    @classmethod
    def _template(cls, t: str) -> str:
        if "{arch}" not in t or "{rate}" not in t:
            raise ValueError(f"{t!r} must contain {{arch}} and {{rate}}")
        return t

    def model_name(self, arch: str, rate: float) -> str:
        """Registered model name of one cell, e.g. ``metacompress-tiny-llava-r0.9``."""
        return self.name_template.format(arch=arch, rate=format_rate(rate))


class TrackingParams(_Section):
    """MLflow experiment; the tracking URI comes from ``MLFLOW_TRACKING_URI`` or the checkout."""

    experiment: str = Field("metacompress", min_length=1)


class ReportParams(_Section):
    """The summary table and plots over every cell."""

    methods: list[str] = Field(min_length=1)
    dpi: int = Field(120, gt=0)


class Params(_Section):
    """The whole ``params.yaml``."""

    grid: GridParams
    data: DataParams
    world: dict[str, Any] = Field(default_factory=dict)
    base: dict[str, Any] = Field(default_factory=dict)
    train: TrainParams
    evaluate: EvaluateParams
    # "register" would shadow pydantic's BaseModel.register: stored as register_, read as
    # params.yaml's "register" (SectionView maps the name).
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    tracking: TrackingParams = TrackingParams()
    report: ReportParams


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith("["):  # element-level message from a list validator: "[i]=v: ..."
            lines.append(f"{source}: {key}{msg}")
        elif e["type"] in ("missing", "extra_forbidden"):
            lines.append(f"{source}: {key}: {msg}")
        else:
            lines.append(f"{source}: {key}={e['input']!r}: {msg}")
    return "\n".join(lines)


def validate(raw: Mapping[str, Any], *, source: str = DEFAULT_PATH) -> Params:
    """Validate a parsed params mapping; ValueError names ``source`` and every bad key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(dict(raw))
    except ValidationError as err:
        raise ValueError(_format_errors(err, source)) from None
    _check_from_dict("mc_core.data.synthetic", "WorldConfig", params.world, "world", source)
    _check_keys("mc_core.teacher", "TeacherConfig", params.base, "base", source)
    reports = set(params.report.methods) - set(params.evaluate.methods)
    if reports:
        raise ValueError(f"{source}: report.methods={params.report.methods!r}: "
                         f"{sorted(reports)} not in evaluate.methods")
    return params


def _check_from_dict(module: str, cls: str, section: dict[str, Any], key: str,
                     source: str) -> None:
    """Validate a pass-through section with its owner's ``<Config>.from_dict``."""
    try:
        owner = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):  # owner absent: its stage checks the section itself
        return
    try:
        owner.from_dict(section, where=key)
    except (TypeError, ValueError) as err:
        msg = str(err)
        raise ValueError(f"{source}: {msg if msg.startswith(key) else f'{key}: {msg}'}") from None


def _check_keys(module: str, cls: str, section: dict[str, Any], key: str, source: str) -> None:
    """Unknown keys of a section consumed by ``<module>.<cls>`` (a dataclass), found cheaply.

    The field names are read from the module's source when it is not imported yet (the teacher
    module imports transformers); its own ``from_dict`` checks the values when its stage runs.
    """
    if module in sys.modules:
        _check_from_dict(module, cls, section, key, source)
        return
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return
    tree = ast.parse(Path(spec.origin).read_text())
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        return
    fields = {n.target.id for n in node.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ValueError(f"{source}: {key}: unknown keys {unknown}; expected a subset of "
                         f"{sorted(fields)}")


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
            raise AttributeError(f"{self._who} reads params section {name!r} but declares only "
                                 f"{sorted(self._sections)} (keep dvc.yaml params in sync)")
        return getattr(self._params, "register_" if name == "register" else name)

    @property
    def declared(self) -> frozenset[str]:
        """The sections this view exposes."""
        return self._sections


def load(path: str | Path = DEFAULT_PATH, *, sections: Iterable[str] | None = None,
         who: str = "caller") -> Params | SectionView:
    """Validate the whole params file, then return it (or a view of the declared ``sections``)."""
    params = validate(read_yaml(path), source=str(path))
    return params if sections is None else SectionView(params, sections, who=who)


def check_kwargs(fn: Any, values: Mapping[str, Any], *, where: str) -> None:
    """Fail unless every key of ``values`` is a keyword parameter of ``fn``.

    Used for sections passed straight to another module's function (``world`` to the synthetic
    generator, ``base`` to the teacher trainer): the error names ``<where>.<key>``.
    """
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = {n for n, p in sig.parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for key in values:
        if key not in accepted:
            raise ValueError(f"{where}.{key}: not a parameter of "
                             f"{fn.__module__}.{fn.__qualname__} (accepts: {sorted(accepted)})")


# Profiles: overlays on the committed params.yaml (= "default"). Nested dicts merge; lists and
# scalars replace. Smoke keeps every stage of the DAG but shrinks each to seconds.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {
        "grid": {"archs": ["tiny-llava"], "rates": [0.5, 0.9]},
        "data": {"train": {"dialogues": 24}, "test": {"dialogues": 8}},
        "base": {"train_images": 32, "eval_dialogues": 8, "curve_dialogues": 8,
                 "stage1_seconds": 5.0, "stage1_max_steps": 4, "stage2_seconds": 5.0,
                 "stage2_max_steps": 4, "warmup_steps": 2, "curve_every_seconds": 60.0},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 4, "log_every": 1},
        "evaluate": {"methods": ["none", "sample", "metacompress"], "max_dialogues": 8,
                     "batch_size": 8},
        "report": {"methods": ["none", "sample", "metacompress"]},
        "tracking": {"experiment": "metacompress-smoke"},
    },
    "full": {
        "grid": {"archs": ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]},
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


def profile_params(name: str, base: Mapping[str, Any], *,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    """Write a params mapping as YAML atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = yaml.safe_dump(dict(params), sort_keys=False, default_flow_style=False)
    tmp.write_text(header + text)
    tmp.replace(path)
    return path


if __name__ == "__main__":  # python -m mc_core.config [path]: validate and print the cells
    import sys

    p = load(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH)
    assert isinstance(p, Params)
    print("\n".join(cell_key(a, r) for a, r in p.grid.cells()))
