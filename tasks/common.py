"""Helpers shared by the stage entry points: params access, cell paths, atomic outputs.

Every stage runs from the DVC workspace root (the checkout, or ``runs/<profile>/``), so the paths
here are relative to the working directory, exactly as ``dvc.yaml`` declares them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mc_core import config

PARAMS_ENV = "MC_PARAMS"  # another params file for a one-off run (default: params.yaml)
# Torch threads per stage process. One thread by default: on 2 shared cores, two threads ran a
# tiny conversation ~90x slower than one when the other core was busy (measured), and the
# flow may run two cells at once. Raise it on a machine with cores to spare.
THREADS_ENV = "MC_TORCH_THREADS"
DATA_TRAIN = Path("data/train")
DATA_TEST = Path("data/test")


def base_dir(arch: str) -> Path:
    """``models/base/<arch>``: the base model (``base@<arch>`` out)."""
    return Path("models/base") / arch


def compressor_dir(arch: str, rate: float) -> Path:
    """``models/compressors/<arch>-r<rate>``: the trained compressor (``train@`` out)."""
    return Path("models/compressors") / f"{arch}-r{config.format_rate(rate)}"


def cell_file(kind: str, arch: str, rate: float, suffix: str = ".json") -> Path:
    """``reports/<kind>/<arch>-<rate><suffix>`` (train metrics, curves, eval, registry)."""
    return Path("reports") / kind / f"{config.cell_key(arch, rate)}{suffix}"


def state_dir(arch: str, rate: float) -> Path:
    """Resumable training state, outside the DVC out (DVC deletes outs before a stage runs)."""
    return Path("cache/train-state") / config.cell_key(arch, rate)


def load_params(sections: Sequence[str], who: str) -> config.SectionView:
    """Validate all of params.yaml, then expose only the ``sections`` the stage declares.

    Also fixes the stage's torch thread count (``MC_TORCH_THREADS``, default 1).
    """
    import torch

    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    view = config.load(os.environ.get(PARAMS_ENV, config.DEFAULT_PATH), sections=sections,
                       who=who)
    assert isinstance(view, config.SectionView)
    return view


def cell_args(description: str, argv: Sequence[str] | None = None) -> tuple[str, float]:
    """Parse ``--arch A --rate R`` (the rate checked like ``grid.rates``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--rate", required=True, type=float)
    ns = ap.parse_args(argv)
    try:
        config._check_rate(ns.rate)
    except ValueError as err:
        raise ValueError(f"--rate={ns.rate!r}: {err}") from None
    return ns.arch, ns.rate


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]],
              fields: Sequence[str]) -> Path:
    """Write rows as CSV atomically (missing fields empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def fresh_dir(path: str | Path) -> Path:
    """An empty temporary sibling of ``path`` to build an output folder in (see publish_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))


def publish_dir(tmp: Path, path: str | Path) -> Path:
    """Replace ``path`` by the finished folder ``tmp`` (rename; the old one is removed first)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def flat(prefix: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a nested mapping into ``prefix.key.sub`` keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flat(key, v))
        else:
            out[key] = v
    return out
