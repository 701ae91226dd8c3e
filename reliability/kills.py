"""``kill -9`` of each stage at a random point, and of a Prefect flow run mid-flow.

Each trial makes one stage never-run in a clone of the reference workspace (its ``dvc.lock``
entry and outputs removed: DVC cannot restore it from a cache), runs it
(``dvc repro --no-run-cache -s <stage>``) and SIGKILLs its whole process group (DVC and the
stage's Python) at a seeded random point: even trials anywhere in the stage's measured
duration, odd trials (for the stages that checkpoint: ``base``, ``train``) a random moment
after the first checkpoint. Then:

- nothing half-written is published: each of the stage's outputs is absent or complete and
  equal to the reference's;
- a plain ``dvc repro --no-run-cache`` (the stage really reruns) completes, resuming from the
  checkpoint where one was left;
- every output of the workspace then equals the uninterrupted reference run (timing fields
  aside), and the registry holds exactly one version per cell with the reference's champion.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from reliability import registry_state as R
from reliability import workspace as W
from reliability.core import Context, Trial, fault
from reliability.workspace import STAGES


def _checkpoint(ws: Path, kind: str) -> Path | None:
    """The resumable state a killed ``base`` / ``train`` left, if any."""
    if kind == "base":
        p = ws / "models" / "base" / f"{W.ARCH}-ckpt.pt"
        return p if p.is_file() else None
    if kind == "train":
        found = sorted((ws / "cache" / "train-state").glob(f"{W.CELL}/*/train_state.json"))
        return found[0] if found else None
    return None


def _kill_point(ctx: Context, ws: Path, kind: str, stage: str, trial: int, proc) -> str:
    """Wait until the seeded kill point; returns how it was chosen."""
    rng = ctx.rng(f"kill-{kind}", trial)
    if trial % 2 == 1 and kind in ("base", "train"):
        t0 = time.monotonic()
        while _checkpoint(ws, kind) is None and proc.poll() is None:
            if time.monotonic() - t0 > 600:
                break
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.0)
        time.sleep(delay)
        return f"{delay:.2f} s after the first checkpoint"
    took = ctx.took.get(stage, 10.0)
    delay = rng.uniform(0.05, 0.85) * took
    time.sleep(delay)
    return f"at {delay:.1f} s of a {took:.0f} s stage"


def kill_trial(ctx: Context, kind: str, trial: int) -> Trial:
    """One kill of stage ``kind``: half-written outputs, rerun, identity, registry."""
    ref = ctx.reference()
    stage = STAGES[kind]
    ws = ctx.clone(f"kill-{kind}")
    if kind == "register":
        R.unregister(ws)
    outs = sorted(W.lock_outs(ref)[stage])
    want = W.snapshot(ref, W.all_outs(ref))
    W.forget(ws, stage)  # a first run of the stage: nothing to restore from DVC's caches
    proc = W.spawn([str(W.BIN / "dvc"), "repro", "--no-run-cache", "-s", stage], ws)
    point = _kill_point(ctx, ws, kind, stage, trial, proc)
    finished = proc.poll() is not None
    W.kill9(proc)
    after = W.snapshot(ws, outs)
    half = [p for p in outs if after[p] is not None and after[p] != want[p]]
    ckpt = _checkpoint(ws, kind)
    left = f"; left {ckpt.relative_to(ws)}" if ckpt else ""
    if kind == "train" and ckpt:
        left += f" at step {json.loads(ckpt.read_text())['step']}"
    present = sum(v is not None for v in after.values())
    junk = W.litter(ws)  # unpublished temporary siblings: clutter, never read
    how = (
        f"kill -9 {point}{' (stage had already finished)' if finished else ''}: "
        f"{present}/{len(outs)} outputs present, all complete{left}"
        f"{f'; {len(junk)} unpublished temp file(s) left' if junk else ''}"
    )
    if half:
        return Trial(False, True, f"kill -9 {point}: half-written outputs published: {half}")
    r = W.dvc(ws, "repro", "--no-run-cache")
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        return Trial(
            False,
            False,
            f"{how}; rerun failed (exit {r.returncode}): {out.strip().splitlines()[-3:]}",
        )
    resumed = "resuming" in out or (kind == "base" and ckpt is not None)
    got = W.snapshot(ws, W.all_outs(ref))
    diff = [p for p in want if got.get(p) != want[p]]
    reg = R.check_registry(ws, ref)
    how += (
        f"; rerun ran {W.ran(out) or 'nothing'}"
        f"{' (resumed)' if resumed and ckpt else ''}; outputs "
        f"{'identical to the uninterrupted run' if not diff else f'DIFFER: {diff}'}; "
        f"{reg.how}"
    )
    return Trial(not diff and reg.ok, bool(diff) or reg.lost, how)


def _make(kind: str, ci: bool) -> None:
    def fn(ctx: Context, trial: int) -> Trial:
        return kill_trial(ctx, kind, trial)

    resumable = kind in ("base", "train")
    fn.__doc__ = (
        f"kill -9 of a first `dvc repro -s {STAGES[kind]}` at a seeded random point"
        f"{' (odd trials: after its first checkpoint)' if resumable else ''}"
        "; no output half-written; `dvc repro --no-run-cache` completes"
        f"{', resuming' if resumable else ''}; all outputs identical to "
        "the uninterrupted run; one registry version per cell, same champion"
    )
    fault(f"kill-{kind}", "kill", ci=ci)(fn)


for _kind in STAGES:
    _make(_kind, ci=_kind == "train")
