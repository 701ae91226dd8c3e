"""Recipe sweeps as DVC experiments: a grid of ``-S`` overrides on one cell, queued and run.

Each combination of the given values becomes one ``dvc exp run --queue`` of the cell's
``metrics@<cell>`` stage (DVC runs what it needs upstream: the cell's ``train@`` and
``evaluate@``; nothing is registered), named ``<prefix>-<i>``; ``dvc queue start -j N`` runs them
in DVC's own temporary workspaces, so the workspace's ``params.yaml`` and outputs stay as they
are. Every trial is then an experiment that ``dvc exp show`` lists with its parameters and the
cell's compact metrics, including ``val.<method>`` (data/val, where a recipe is chosen), and an
MLflow run tagged ``dvc_exp=<name>``. Choose on ``val``: the test split only reports.

Usage::

    python -m tasks.sweep --cell tiny-llava-0.9 -S train.lr=0.01,0.02 -S train.momentum=0.9 -j 2
    make sweep CELL=tiny-llava-0.9 SET="-S train.lr=0.01,0.02"

then ``dvc exp show --only-changed`` (or ``--json``), ``dvc exp diff``, ``dvc plots diff``;
``dvc exp apply <name>`` takes a trial's params into the workspace.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks import cells, common

BIN = Path(sys.executable).parent


def grid(sets: list[str]) -> list[list[str]]:
    """Every combination of ``key=v1,v2,...`` overrides, as lists of ``key=v``.

    Raises:
        ValueError: an override without ``=`` or without a value.
    """
    axes = []
    for s in sets:
        key, eq, values = s.partition("=")
        choices = [v.strip() for v in values.split(",")]
        if not eq or not key.strip() or not all(choices):
            raise ValueError(f"-S {s!r}: expected key=value[,value...]")
        axes.append([f"{key.strip()}={v}" for v in choices])
    return [list(c) for c in itertools.product(*axes)]


def _dvc(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], env=env, capture_output=True, text=True)


def _env() -> dict[str, str]:
    """The queue workers inherit it: MLflow at the checkout's store, not their temp copy's."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def queue(cell: str, combos: list[list[str]], prefix: str, env: dict[str, str]) -> list[str]:
    """Queue one experiment per combination; returns their names."""
    names = []
    for i, combo in enumerate(combos):
        name = f"{prefix}-{i}"
        sets = [a for kv in combo for a in ("-S", kv)]
        r = _dvc(
            "exp", "run", "--queue", "-n", name, *sets, cells.stage_name("metrics", cell), env=env
        )
        if r.returncode != 0:
            raise RuntimeError(f"dvc exp run --queue {' '.join(combo)} failed:\n{r.stderr[-2000:]}")
        names.append(name)
        print(f"sweep: queued {name}: {' '.join(combo)}", flush=True)
    return names


def wait(names: list[str], env: dict[str, str], timeout_s: float) -> dict[str, str]:
    """Poll ``dvc queue status`` until every trial left the queue; their final states."""
    t0, states = time.monotonic(), {}
    while time.monotonic() - t0 < timeout_s:
        out = _dvc("queue", "status", env=env).stdout
        states = {
            n: s
            for n in names
            for line in out.splitlines()
            if n in line
            for s in ("Success", "Failed", "Running", "Queued")
            if s in line
        }
        if len(states) == len(names) and all(s in ("Success", "Failed") for s in states.values()):
            return states
        time.sleep(5)
    raise TimeoutError(f"sweep: trials not finished after {timeout_s:.0f} s: {states}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", required=True, help="<arch>-<rate>, e.g. tiny-llava-0.9")
    ap.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        dest="sets",
        help="key=v1,v2,... (repeatable; the grid is their product)",
    )
    ap.add_argument("-j", "--jobs", type=int, default=1, help="trials run at once")
    ap.add_argument("--prefix", default=None, help="experiment names <prefix>-<i>")
    ap.add_argument("--no-wait", action="store_true", help="queue and start, do not wait")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait")
    a = ap.parse_args(argv)
    if not a.sets:
        ap.error("give at least one -S key=value[,value...]")
    arch = cells.arch_of(a.cell)
    try:
        rate = float(a.cell[len(arch) + 1 :])
    except ValueError:
        ap.error(f"--cell {a.cell!r}: expected <arch>-<rate>, e.g. tiny-llava-0.9")
    cell = cells.cell_key(*common.check_cell(arch, rate))
    combos = grid(a.sets)
    env = _env()
    names = queue(cell, combos, a.prefix or f"sweep-{cell}-{int(time.time())}", env)
    r = _dvc("queue", "start", "-j", str(a.jobs), env=env)
    if r.returncode != 0:
        raise RuntimeError(f"dvc queue start failed:\n{r.stderr[-2000:]}")
    if a.no_wait:
        print("sweep: started; `dvc queue status`, then `dvc exp show`", flush=True)
        return 0
    states = wait(names, env, a.timeout)
    for n in names:
        print(f"sweep: {n}: {states[n]}", flush=True)
    print("sweep: `dvc exp show --only-changed` compares them (choose on val.*)", flush=True)
    return 0 if all(s == "Success" for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
