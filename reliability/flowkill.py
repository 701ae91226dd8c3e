"""The Prefect flow killed mid-flow, then run again.

A real worker needs a Prefect server, a work pool and a 10 s polling worker (about a minute
of start-up per trial on two cores), so the flow run is the unit killed instead: the
``train-all`` flow runs in a subprocess (``train_all(checkout=<workspace>)`` on Prefect's
ephemeral API, its own ``PREFECT_HOME``) on a clone where both cells' train, evaluate and
register stages never ran; once DVC has recorded the first train stage (plus a seeded random
delay of up to 6 s) the subprocess's whole process group (flow, ephemeral server, ``dvc`` and
stage processes) gets SIGKILL. Expected: no process of the run survives (nothing hangs), and
running the flow again redoes only what is missing (the outputs of every stage DVC had
recorded keep their files, untouched) and ends equal to the reference run, one registry
version per cell.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

from reliability import registry_state as R
from reliability import workspace as W
from reliability.core import Context, Trial, fault

FLOW = "from flows.train_all import train_all; train_all(checkout={ws!r})"


def _env(ws, home) -> dict[str, str]:
    return {
        "PYTHONPATH": str(W.ROOT),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
        # Start-up of the ephemeral API took over 120 s on two busy cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900",
        "MC_MAX_PARALLEL": "2",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def _alive(ws) -> list[str]:
    """Processes whose command line or working directory is in the workspace."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(ws)) or str(ws) in cmd:
            found.append(f"{pid}: {cmd[:80]}")
    return found


def _recorded(ws, prefix: str) -> list[str]:
    """Stages in the workspace's dvc.lock whose name starts with ``prefix``."""
    try:
        return [s for s in W.lock_outs(ws) if s.startswith(prefix)]
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError):  # being written
        return []


def _mtimes(ws, paths: list[str]) -> dict[str, int]:
    """``{file: mtime_ns}`` of every file under ``paths`` (relative to ``ws``)."""
    out = {}
    for p in paths:
        root = ws / p
        for f in [root] if root.is_file() else root.rglob("*") if root.is_dir() else []:
            if f.is_file():
                out[str(f.relative_to(ws))] = f.stat().st_mtime_ns
    return out


def _flow_states(home) -> list[str]:
    db = home / "prefect.db"
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT state_type FROM flow_run")]


@fault("kill-flow-run", "kill")
def kill_flow(ctx: Context, trial: int) -> Trial:
    """kill -9 of the train-all flow run's process group (flow, ephemeral Prefect API, dvc and
    stages) at a seeded random moment after the first train stage is recorded; nothing left
    running; the flow run again redoes only the stages DVC had not recorded; outputs and
    registry equal the reference"""
    ref = ctx.reference()
    ws = ctx.clone("flow")
    home = ctx.scratch("prefect-home")
    cells = [f"{W.ARCH}-{r}" for r in W.RATES]
    for kind in ("register", "evaluate", "train", "report"):
        for c in cells if kind != "report" else [None]:
            W.forget(ws, f"{kind}@{c}" if c else kind)
    c = R.tracking_client(ws)
    for rate in W.RATES:
        name = f"metacompress-{W.ARCH}-r{rate}"
        if c.search_registered_models(f"name = '{name}'"):
            c.delete_registered_model(name)
    proc = W.spawn([sys.executable, "-c", FLOW.format(ws=str(ws))], ws, **_env(ws, home))
    t0 = time.monotonic()
    while not _recorded(ws, "train@") and proc.poll() is None:
        if time.monotonic() - t0 > 900:
            break
        time.sleep(0.2)
    delay = ctx.rng("flow", trial).uniform(0, 6)
    time.sleep(delay)
    finished = proc.poll() is not None
    log = W.kill9(proc)
    if finished:  # no kill happened: not a trial of this fault (a flow error is reported)
        return Trial(
            False,
            False,
            f"the flow ended (exit {proc.returncode}) before the kill point: {log.strip()[-400:]}",
        )
    time.sleep(1)
    alive = _alive(ws)
    # What DVC recorded as done when the flow died: those outputs must not be redone.
    done = _recorded(ws, "")
    stamps = _mtimes(ws, sorted({p for s in done for p in W.lock_outs(ws).get(s, {})}))
    states = _flow_states(home)
    todo = [f"{k}@{c_}" for c_ in cells for k in ("train", "evaluate", "register")]
    how = (
        f"killed {delay:.1f} s after the first train stage was recorded: "
        f"{len([s for s in todo if s in done])}/{len(todo)} cell stages recorded; processes "
        f"left: {len(alive)}; flow run records {states}"
    )
    if alive:
        return Trial(False, False, f"{how}: {alive}; log: {log[-300:]}")
    r = subprocess.run(
        [sys.executable, "-c", FLOW.format(ws=str(ws))],
        cwd=ws,
        env=W.env(ws, **_env(ws, home)),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        return Trial(False, False, f"{how}; flow rerun failed: {(r.stderr or '')[-600:]}")
    now = _mtimes(ws, list({str(p).split("/", 2)[0] for p in stamps}))
    touched = [p for p, m in stamps.items() if now.get(p) != m]
    want = W.snapshot(ref, W.all_outs(ref))
    got = W.snapshot(ws, W.all_outs(ref))
    diff = [p for p in want if got.get(p) != want[p]]
    reg = R.check_registry(ws, ref)
    how += (
        f"; flow rerun rewrote {len(touched)} of the {len(stamps)} output files of the "
        f"recorded stages; outputs "
        f"{'identical to the reference' if not diff else f'DIFFER {diff}'}; {reg.how}"
    )
    return Trial(not touched and not diff and reg.ok, bool(diff) or reg.lost, how)
