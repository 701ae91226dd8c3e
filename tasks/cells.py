"""How the pipeline names a cell (arch, rate) and what belongs to it: one module for every rule.

A cell is one (arch, rate) of ``grid``; its rate is written as DVC's matrix writes it
(:func:`format_rate`, ``0.5`` -> ``"0.5"``), so the names below match ``dvc.yaml``'s::

    cell key         <arch>-<rate>                       tiny-llava-0.9
    stage            <kind>@<arch>-<rate>, <kind>@<arch>  train@tiny-llava-0.9, base@tiny-llava
    compressor       models/compressors/<arch>-r<rate>   (+ -seeds: the extra seeds)
    report           reports/<kind>/<arch>-<rate>.json   reports/eval/tiny-llava-0.9.json
                     reports/<kind>/<arch>.json          reports/base/tiny-llava.json
    override key     <arch>@<rate>                       train.overrides: tiny-qwen2-vl@0.9
    any-rate         rate :data:`ANY`: one compressor per arch trained over many rates
                     (``grid.any_rate_archs``): cell key, compressor and reports
                     ``<arch>-any`` (models/compressors/tiny-llava-any,
                     reports/eval/tiny-llava-any.json), stages ``<kind>-any@<arch>``,
                     registered model ``register.any_name_template`` (metacompress-<arch>-any)
    training run     train-<arch>-r<rate>                (MLflow)
    registered model metacompress-<arch>-r<rate>         (register.name_template,
                                                          mc_registry.model_name)

The registered-model rule and the rate's spelling live in ``mc_registry.names`` (the front-ends
read the registry without the pipeline) and are re-used here. :func:`check_rate` is the
pipeline's one rate check. Paths are relative to the workspace root, as ``dvc.yaml`` declares
them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mc_core.compressors import ops
from mc_registry.names import ANY, format_rate, model_name

__all__ = [
    "ANY",
    "any_method",
    "arch_of",
    "base_dir",
    "cell_file",
    "cell_key",
    "check_rate",
    "compressor_dir",
    "compressor_name",
    "format_rate",
    "model_name",
    "override_key",
    "parse_rate",
    "parse_override_key",
    "report_dir",
    "report_file",
    "run_name",
    "seeds_dir",
    "split_stage",
    "stage_name",
    "state_dir",
]

REPORTS = Path("reports")


def check_rate(rate: Any, key: str) -> float:
    """``rate`` as a float, checked by the library's rule (``mc_core.compressors.ops.check_rate``:
    a number in (0, 1); bools, strings and NaN refused).

    Raises:
        ValueError: ``<key>=<rate>: rate must be in (0, 1) ...``, ``key`` naming where the value
            came from: a params.yaml key (``grid.rates[1]``; ``[1]`` inside a section's
            validator, which prefixes the section) or a command-line option (``--rate``).
    """
    try:
        return ops.check_rate(rate, where="rate")
    except ValueError as err:
        raise ValueError(f"{key}={rate!r}: {err}") from None


def parse_rate(value: Any, key: str) -> float | str:
    """A rate argument: :data:`ANY` (an any-rate compressor) or a rate checked by
    :func:`check_rate` (``key`` names where it came from)."""
    return ANY if value == ANY else check_rate(value, key)


def any_method(method: str) -> str:
    """The method key of a trained method's any-rate compressor in reports:
    ``metacompress-any``."""
    return f"{method}-{ANY}"


def cell_key(arch: str, rate: float | str) -> str:
    """The DVC matrix key of one cell: ``<arch>-<rate>`` (stage ``train@<arch>-<rate>``);
    ``<arch>-any`` for the arch's any-rate compressor."""
    return f"{arch}-{format_rate(rate)}"


def arch_of(key: str) -> str:
    """The arch of a cell key: ``tiny-llava-next-0.75`` -> ``tiny-llava-next``."""
    return re.sub(r"-[0-9.e+-]+$", "", key)


def stage_name(kind: str, key: str | None = None) -> str:
    """``<kind>@<key>`` (a cell key or an arch), or ``<kind>`` for a stage without a matrix."""
    return f"{kind}@{key}" if key else kind


def split_stage(name: str) -> tuple[str, str]:
    """``train@tiny-llava-0.9`` -> (``train``, ``tiny-llava-0.9``); ``report`` -> (``report``,
    ``""``)."""
    kind, _, key = name.partition("@")
    return kind, key


def override_key(arch: str, rate: float | None = None) -> str:
    """The override key of an arch, ``<arch>``, or of one cell, ``<arch>@<rate>``."""
    return arch if rate is None else f"{arch}@{format_rate(rate)}"


def parse_override_key(key: str) -> tuple[str, float | None]:
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
    return arch, check_rate(value, "rate")


def compressor_name(arch: str, rate: float | str) -> str:
    """``<arch>-r<rate>``: the cell's compressor folder (and its training run's suffix);
    ``<arch>-any`` for the any-rate one."""
    return f"{arch}-{ANY}" if rate == ANY else f"{arch}-r{format_rate(rate)}"


def run_name(arch: str, rate: float | str) -> str:
    """``train-<arch>-r<rate>``: the MLflow run that trains the cell."""
    return f"train-{compressor_name(arch, rate)}"


def base_dir(arch: str) -> Path:
    """``models/base/<arch>``: the base model (``base@<arch>`` out)."""
    return Path("models/base") / arch


def compressor_dir(arch: str, rate: float) -> Path:
    """``models/compressors/<arch>-r<rate>``: the trained compressor (``train@`` out)."""
    return Path("models/compressors") / compressor_name(arch, rate)


def seeds_dir(arch: str, rate: float) -> Path:
    """``models/compressors/<arch>-r<rate>-seeds``: one ``seed-<k>/`` checkpoint per extra seed
    (``train.seeds`` > 1; empty otherwise). Not registered: they measure the seed spread."""
    return Path("models/compressors") / f"{compressor_name(arch, rate)}-seeds"


def state_dir(arch: str, rate: float) -> Path:
    """Resumable training state, outside the DVC out (DVC deletes outs before a stage runs)."""
    return Path("cache/train-state") / cell_key(arch, rate)


def report_dir(kind: str) -> Path:
    """``reports/<kind>``: one file per cell or arch (``eval``, ``registry``, ``base``...)."""
    return REPORTS / kind


def report_file(kind: str, key: str, suffix: str = ".json") -> Path:
    """``reports/<kind>/<key><suffix>``: the report of a cell (``key`` a cell key) or of an arch
    (``reports/base/<arch>.json``)."""
    return report_dir(kind) / f"{key}{suffix}"


def cell_file(kind: str, arch: str, rate: float, suffix: str = ".json") -> Path:
    """``reports/<kind>/<arch>-<rate><suffix>`` (train metrics, curves, eval, registry)."""
    return report_file(kind, cell_key(arch, rate), suffix)
