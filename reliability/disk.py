"""Disk full while saving a checkpoint, a training state, a dataset and the target cache.

The stage runs as a user would run it by hand (``python -m tasks.<stage>``, so the previous
output is still in place: ``dvc repro`` would first move it to the DVC cache) with the
``inject/`` start-up hook: the chosen write puts half its bytes on disk, then fails with
``OSError(ENOSPC)``. Expected: the stage exits non-zero with one message naming the target,
the free space and what to free (``mc_core.io``), no traceback; every previous output is intact
and no temporary file is left; the same command without the fault then completes and the
outputs equal the reference run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reliability import workspace as W
from reliability.core import Context, Trial, fault

INJECT = Path(__file__).resolve().parent / "inject"
CELL_ARGS = ("--arch", W.ARCH, "--rate", "0.5")


def disk_trial(
    ctx: Context,
    tag: str,
    module: str,
    args: tuple[str, ...],
    where: str,
    target: str,
    *,
    fresh: str | None = None,
) -> Trial:
    """Run ``module`` with ENOSPC injected on paths containing ``where``; check the aftermath."""
    ref = ctx.reference()
    ws = ctx.clone(tag)
    if fresh:  # make the stage write this (a cache) rather than find it
        shutil.rmtree(ws / fresh)
    outs = W.all_outs(ref)
    want = W.snapshot(ref, outs)
    r = W.python(ws, "-m", module, *args, PYTHONPATH=str(INJECT), MC_FAULT_ENOSPC=where)
    out = (r.stdout or "") + (r.stderr or "")
    msg = next((ln for ln in out.splitlines() if "no space left while writing" in ln), "")
    clear = r.returncode != 0 and target in msg and "free" in msg and "Traceback" not in out
    got = W.snapshot(ws, outs)
    lost = [p for p in outs if got[p] != want[p]]
    junk = W.litter(ws)
    published = [f for f in (ws / fresh).glob("*/store.json")] if fresh else []
    if any(json.loads(f.read_text()).get("complete") for f in published):  # (.lock files stay)
        junk.append(f"{fresh} (a store was published)")
    how = (
        f"ENOSPC writing {target}: exit {r.returncode}, message "
        f"{msg.strip()[:220]!r}; previous outputs "
        f"{'intact' if not lost else f'CHANGED {lost}'}; "
        f"{'no temporary file left' if not junk else f'left {junk}'}"
    )
    if not clear or lost or junk:
        tail = " | ".join(out.strip().splitlines()[-4:])
        return Trial(False, bool(lost), f"{how}; output tail: {tail[-600:]}")
    r2 = W.python(ws, "-m", module, *args)
    again = W.snapshot(ws, outs)
    diff = [p for p in outs if again[p] != want[p]]
    how += (
        f"; rerun without the fault: exit {r2.returncode}, outputs "
        f"{'identical to the reference' if not diff else f'DIFFER {diff}'}"
    )
    return Trial(r2.returncode == 0 and not diff, bool(diff), how)


@fault("disk-full-checkpoint", "disk", ci=True)
def checkpoint_full(ctx: Context, trial: int) -> Trial:
    """ENOSPC while `tasks.train` saves the compressor checkpoint (half the safetensors
    written): clear message naming the folder and free space, previous checkpoint intact,
    rerun identical"""
    return disk_trial(
        ctx,
        "disk-ckpt",
        "tasks.train",
        CELL_ARGS,
        f"compressors/.{W.ARCH}-r0.5.tmp",
        f"models/compressors/{W.ARCH}-r0.5",
    )


@fault("disk-full-train-state", "disk")
def state_full(ctx: Context, trial: int) -> Trial:
    """ENOSPC while `tasks.train` writes its resumable state (a state-*.safetensors file):
    clear message, no state or output half-published, rerun identical"""
    return disk_trial(ctx, "disk-state", "tasks.train", CELL_ARGS, ".state-", "train-state")


@fault("disk-full-dataset", "disk")
def dataset_full(ctx: Context, trial: int) -> Trial:
    """ENOSPC while `tasks.prepare` saves data/train (half the Arrow shard written): clear
    message, previous dataset intact, rerun identical"""
    return disk_trial(ctx, "disk-data", "tasks.prepare", (), "data/.train.tmp", "data/train")


@fault("disk-full-target-cache", "disk")
def cache_full(ctx: Context, trial: int) -> Trial:
    """ENOSPC while `tasks.train` saves the shared target cache (built afresh): clear message,
    no cache published, outputs intact, rerun rebuilds it and trains identically"""
    return disk_trial(
        ctx,
        "disk-cache",
        "tasks.train",
        CELL_ARGS,
        "cache/targets/",
        "cache/targets/",
        fresh="cache/targets",
    )
