"""MLflow tracking unreachable during ``train`` or ``register``, then restored.

The outage is a tracking URI on a local port nothing listens on (connection refused), with
MLflow's own retry bounded for the trial (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, backoff
factor 1: seconds; MLflow's defaults, 7 retries with backoff factor 2, failed after 4 min 15 s
when measured here). Expected: the stage fails with one message naming the URI and what to
do; committed outputs stay intact (in the DVC cache, ``dvc.lock`` unchanged); once the store
is back a plain ``dvc repro`` registers exactly once (one version per cell) and ``champion``
is where the reference run put it.
"""

from __future__ import annotations

import socket
import time

from reliability import registry_state as R
from reliability import workspace as W
from reliability.core import Context, Trial, fault
from reliability.workspace import STAGES


def closed_port() -> int:
    """A local TCP port with no listener (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outage_trial(ctx: Context, kind: str) -> Trial:
    """Run stage ``kind`` of the cell against a dead tracking URI, then recover."""
    ref = ctx.reference()
    ws = ctx.clone(f"outage-{kind}")
    if kind == "register":
        R.unregister(ws)
    lock_before = (ws / "dvc.lock").read_text()
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    r = W.dvc(
        ws,
        "repro",
        "-f",
        "-s",
        STAGES[kind],
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )
    took = time.monotonic() - t0
    out = (r.stdout or "") + (r.stderr or "")
    msg = next((ln for ln in out.splitlines() if "unreachable" in ln), "")
    clear = r.returncode != 0 and uri in msg and "Traceback" not in out
    intact = (ws / "dvc.lock").read_text() == lock_before
    how = (
        f"{STAGES[kind]} with MLFLOW_TRACKING_URI={uri} (refused): exit {r.returncode} after "
        f"{took:.0f} s, message {msg.strip()[:160]!r}...; dvc.lock "
        f"{'unchanged' if intact else 'CHANGED'}"
    )
    if not (clear and intact):
        tail = " | ".join(out.strip().splitlines()[-4:])
        return Trial(False, not intact, f"{how}; output tail: {tail[-600:]}")
    r2 = W.dvc(ws, "repro")  # the store is back (the workspace's own)
    out2 = (r2.stdout or "") + (r2.stderr or "")
    want = W.snapshot(ref, W.all_outs(ref))
    got = W.snapshot(ws, W.all_outs(ref))
    diff = [p for p in want if got.get(p) != want[p]]
    reg = R.check_registry(ws, ref)
    how += (
        f"; restored, `dvc repro` exit {r2.returncode} ran {W.ran(out2) or 'nothing'}; "
        f"outputs {'identical to the reference' if not diff else f'DIFFER {diff}'}; "
        f"{reg.how}"
    )
    return Trial(r2.returncode == 0 and not diff and reg.ok, bool(diff) or reg.lost, how)


@fault("mlflow-down-train", "outage")
def down_train(ctx: Context, trial: int) -> Trial:
    """tracking server refused while `dvc repro -s train@...` starts: fails before compute
    naming the URI; after restore `dvc repro` retrains identically, registry unchanged"""
    return outage_trial(ctx, "train")


@fault("mlflow-down-register", "outage", ci=True)
def down_register(ctx: Context, trial: int) -> Trial:
    """tracking server refused at registration (cell not yet registered): fails naming the URI,
    nothing registered; after restore `dvc repro` registers exactly once, champion as in the
    reference"""
    return outage_trial(ctx, "register")
