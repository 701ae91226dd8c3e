"""The pipeline's stage kinds and their order, read from ``dvc.yaml``.

A stage kind is one entry of ``dvc.yaml``'s ``stages``. Its ``matrix`` says how it fans out:
none (one shared stage, e.g. ``prepare``), ``arch`` (one per architecture, e.g. ``base@<arch>``)
or ``arch`` x ``rate`` (one per cell, e.g. ``train@<arch>-<rate>``). Its order comes from its
``deps`` and the outputs (``outs``, ``metrics``, ``plots``) of the other kinds: a kind runs
after every kind whose output it reads. So a new stage needs its task file, its ``dvc.yaml``
entry and its params section; the flow learns of it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

AXES = {(): "shared", ("arch",): "arch", ("arch", "rate"): "cell"}
_ITEM = re.compile(r"\$\{item\.\w+\}")


@dataclass(frozen=True)
class Kind:
    """One stage kind: its name, its fan-out and the kinds whose outputs it reads."""

    name: str
    fanout: str  # "shared", "arch" or "cell"
    after: frozenset[str]


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (an entry is a path or ``{path: options}``)."""
    out = []
    for e in entries or []:
        out += list(e) if isinstance(e, dict) else [str(e)]
    return [_ITEM.sub("*", p).rstrip("/") for p in out]


def _reads(dep: str, out: str) -> bool:
    """Whether dependency path ``dep`` covers output ``out`` (same path, or one inside other)."""
    return dep == out or out.startswith(dep + "/") or dep.startswith(out + "/")


def load(dvc_yaml: str | Path) -> dict[str, Any]:
    """The parsed ``dvc.yaml``."""
    return yaml.safe_load(Path(dvc_yaml).read_text()) or {}


def kinds(dvc_yaml: str | Path) -> list[Kind]:
    """The stage kinds of the file ``dvc_yaml`` (see :func:`kinds_of`)."""
    return kinds_of(load(dvc_yaml))


def kinds_of(doc: dict[str, Any]) -> list[Kind]:
    """The stage kinds of a parsed ``dvc.yaml``, each after the kinds whose outputs it reads
    (ties keep the file's order).

    Raises:
        ValueError: a matrix over other keys than ``arch`` (and ``rate``), or a cycle.
    """
    stages = doc.get("stages") or {}
    fanout, outs, deps = {}, {}, {}
    for name, spec in stages.items():
        axes = tuple(sorted(spec.get("matrix") or {}))
        if axes not in AXES:
            raise ValueError(
                f"dvc.yaml: stages.{name}.matrix over {list(axes)}: the flow fans "
                "out over nothing, arch, or arch and rate"
            )
        fanout[name] = AXES[axes]
        outs[name] = (
            _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
        )
        deps[name] = _paths(spec.get("deps"))
    after = {
        n: frozenset(
            o for o in stages if o != n and any(_reads(d, p) for d in deps[n] for p in outs[o])
        )
        for n in stages
    }
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and after[n] <= set(order)]
        if not ready:
            left = sorted(set(stages) - set(order))
            raise ValueError(f"dvc.yaml: stages {left} depend on each other in a cycle")
        order += ready
    return [Kind(n, fanout[n], after[n]) for n in order]


def downstream_of_cells(all_kinds: list[Kind]) -> set[str]:
    """Kinds that read (directly or not) what a per-cell kind writes."""
    below = {k.name for k in all_kinds if k.fanout == "cell"}
    found: set[str] = set()
    for k in all_kinds:  # in order: a kind's inputs are classified before it
        if k.fanout != "cell" and k.after & (below | found):
            found.add(k.name)
    return found


def writer_of(doc: dict[str, Any], path: str) -> str | None:
    """The (first) kind of a parsed ``dvc.yaml`` whose outputs lie under ``path``, if any."""
    found = writers_of(doc, path)
    return found[0] if found else None


def writers_of(doc: dict[str, Any], path: str) -> list[str]:
    """Every kind of a parsed ``dvc.yaml`` whose outputs lie under ``path``, in file order
    (``reports/registry``: ``register`` per cell and ``register-any`` per arch)."""
    out = []
    for name, spec in (doc.get("stages") or {}).items():
        written = _paths(spec.get("outs")) + _paths(spec.get("metrics"))
        if any(_reads(path.rstrip("/"), p) for p in written):
            out.append(name)
    return out
