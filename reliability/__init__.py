"""Fault injection: kill, corrupt, overload and starve the pipeline, and count what survives.

``python -m reliability [--faults NAME ...] [--trials N]`` runs each fault on a shrunken
config (the smoke profile, shrunk further: ``workspace.SHRINK``) in temporary git + DVC
workspaces and writes ``reports/reliability.json`` (``{"faults": [{"name", "kind", "tried",
"survived", "lost", "how"}]}``) and ``reports/reliability.md``. See docs/reliability.md.

Modules: ``core`` (registry, trial loop, reports), ``workspace`` (reference run, clones,
hashes), ``registry_state`` (MLflow store comparison), one module per family of faults:
``kills``, ``flowkill``, ``outage``, ``concurrency``, ``disk`` (+ ``inject/``: the ENOSPC
injector a stage process loads), ``badinput``, ``serving`` (bad requests to a served
compressor), ``corrupt``, ``security``.
"""

from __future__ import annotations

MODULES = (
    "kills",
    "flowkill",
    "concurrency",
    "outage",
    "disk",
    "badinput",
    "serving",
    "corrupt",
    "store",
    "security",
)


def load_all() -> None:
    """Import every fault module (each registers its faults in ``core.FAULTS``), in report
    order."""
    import importlib

    for name in MODULES:
        importlib.import_module(f"reliability.{name}")
