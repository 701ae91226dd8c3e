"""Helpers shared by the stage entry points: params access, the cell argument, atomic outputs.

Outputs are published through ``mc_core.io`` (re-exported here: ``write_json``, ``write_text``,
``staged_dir``; ``write_csv`` on top of ``staged_file``).

Every stage runs from the DVC workspace root (the checkout, or ``runs/<profile>/``), so the paths
here are relative to the working directory, exactly as ``dvc.yaml`` declares them. A cell's own
paths and names are ``tasks/cells.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mc_core.io import published, staged_dir, staged_file, write_json, write_text
from mc_core.progress import format_duration, quiet_library_bars
from tasks import cells, params

__all__ = [
    "DATA_TEST",
    "DATA_TRAIN",
    "DATA_VAL",
    "PARAMS_ENV",
    "THREADS_ENV",
    "TRACEBACK_ENV",
    "arch_args",
    "cell_args",
    "check_cell",
    "flat",
    "load_params",
    "staged_dir",
    "stage",
    "write_csv",
    "write_json",
    "write_text",
]

PARAMS_ENV = "MC_PARAMS"  # another params file for a one-off run (default: params.yaml)
# Torch threads per stage process. One thread by default: on 2 shared cores, two threads ran a
# tiny conversation ~90x slower than one when the other core was busy (measured), and the
# flow may run two cells at once. Raise it on a machine with cores to spare.
THREADS_ENV = "MC_TORCH_THREADS"
TRACEBACK_ENV = "MC_TRACEBACK"  # set: a stage's ValueError / OSError shows its traceback too
DATA_TRAIN = Path("data/train")
DATA_TEST = Path("data/test")
DATA_VAL = Path("data/val")  # optional (params data.val): tuning and the registry's gate


def load_params(sections: Sequence[str], who: str) -> params.SectionView:
    """Validate all of params.yaml, then expose only the ``sections`` the stage declares.

    Also fixes the stage's torch thread count (``MC_TORCH_THREADS``, default 1).
    """
    import torch

    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    view = params.load(os.environ.get(PARAMS_ENV, params.DEFAULT_PATH), sections=sections, who=who)
    assert isinstance(view, params.SectionView)
    return view


def cell_args(
    description: str, argv: Sequence[str] | None = None, *, any_rate: bool = False
) -> tuple[str, float | str]:
    """Parse ``--arch A --rate R``, checked by :func:`check_cell`; with ``any_rate`` the rate may
    also be ``any`` (``cells.ANY``: the arch's any-rate compressor)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--rate", required=True, help="a rate in (0, 1)" + (" or 'any'" * any_rate))
    ns = ap.parse_args(argv)
    if any_rate and ns.rate == cells.ANY:
        return params.check_arch(ns.arch, _model_names()), cells.ANY
    try:
        rate = float(ns.rate)
    except ValueError:
        also = f" or {cells.ANY!r}" if any_rate else ""
        raise ValueError(f"--rate={ns.rate!r}: expected a number in (0, 1){also}") from None
    return check_cell(ns.arch, rate)


def arch_args(description: str, argv: Sequence[str] | None = None) -> str:
    """Parse ``--arch A`` (a per-arch stage), checked as :func:`check_cell` checks it."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--arch", required=True)
    return params.check_arch(ap.parse_args(argv).arch, _model_names())


def check_cell(arch: str, rate: float) -> tuple[str, float]:
    """``--arch`` a known arch with a safe name (``params.check_arch``, the ``models`` names of
    the params file included) and ``--rate`` in (0, 1) (``cells.check_rate``)."""
    return params.check_arch(arch, _model_names()), cells.check_rate(rate, "--rate")


def _model_names() -> list[str]:
    """The names of params.yaml's ``models`` section (real archs of your own), if readable.

    The stage validated the whole file already (``load_params``); without one, none.
    """
    path = Path(os.environ.get(PARAMS_ENV, params.DEFAULT_PATH))
    if not path.is_file():
        return []
    models = params.read_yaml(path).get("models")
    return list(models) if isinstance(models, Mapping) else []


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    """Write rows as CSV atomically (missing fields empty)."""
    with staged_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return Path(path)


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


def _cell_from_argv(argv: Sequence[str]) -> str | None:
    """The cell key ``<arch>-<rate>`` (or the arch alone) from ``--arch A --rate R`` in ``argv``."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--arch")
    ap.add_argument("--rate")
    ns, _ = ap.parse_known_args(list(argv))
    if ns.arch and ns.rate is not None:
        return f"{ns.arch}-{ns.rate}"  # as given: the label of a log line, checked by the stage
    return ns.arch


class Terminated(KeyboardInterrupt):
    """SIGTERM received: raised in the main thread so the stage unwinds."""


def _terminate(signum, _frame) -> None:
    raise Terminated(f"signal {signum} (SIGTERM)")


@contextlib.contextmanager
def stage(name: str, argv: Sequence[str] | None = None) -> Iterator[None]:
    """Start and end lines of a stage for its log: the cell, the elapsed time and the outputs
    this process published (``mc_core.io.published``), or the error that ended it.

        [stage train tiny-llava-0.9] start
        [stage train tiny-llava-0.9] done in 3:12 -> models/compressors/tiny-llava-r0.9, ...
    """
    cell = _cell_from_argv(sys.argv[1:] if argv is None else argv)
    label = f"[stage {name}{' ' + cell if cell else ''}]"
    quiet_library_bars()  # a captured stage log gets no library bar frames
    print(f"{label} start", flush=True)
    before, t0 = len(published()), time.monotonic()
    # SIGTERM (DVC / Prefect cancelling, `kill`) unwinds like Ctrl-C, so `finally` blocks and
    # the FAILED marking of an MLflow run happen instead of a silent death.
    main = threading.current_thread() is threading.main_thread()  # signal's own rule
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    except SystemExit as err:
        if err.code not in (0, None):
            print(f"{label} failed after {format_duration(time.monotonic() - t0)}", flush=True)
        raise
    except (ValueError, OSError) as err:
        took = format_duration(time.monotonic() - t0)
        print(f"{label} failed after {took}: {type(err).__name__}", flush=True)
        if os.environ.get(TRACEBACK_ENV):
            raise
        # Bad input (a params key, a dataset row, a file) and disk errors carry their own
        # explanation, naming what and where: print that, not a traceback.
        print(
            f"{label} error: {err}\n(set {TRACEBACK_ENV}=1 for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None
    except BaseException as err:
        took = format_duration(time.monotonic() - t0)
        print(f"{label} failed after {took}: {type(err).__name__}", flush=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    outs = list(dict.fromkeys(str(p) for p in published()[before:] if p.exists()))
    took = format_duration(time.monotonic() - t0)
    print(f"{label} done in {took} -> {', '.join(outs) if outs else 'no files'}", flush=True)
