"""The target store under fault: a shard cut short or taken from another store, and a kill
while the store is written.

The store (``mc_core.training.store``) is the train stage's on-disk copy of what the frozen model
gives for each training dialogue, in shards of ``train.shard_dialogues`` dialogues (one in the
shrunk workspace: four shards). A damaged shard must stop the stage with an error naming it,
never train on it; a kill mid-build must leave only whole shards, which the rerun keeps.
"""

from __future__ import annotations

import json
import shutil

from safetensors import safe_open
from safetensors.torch import save_file

from reliability import workspace as W
from reliability.core import Context, Trial, fault
from reliability.corrupt import _final
from reliability.disk import INJECT
from reliability.workspace import STAGES


def _store(ws) -> W.Path:
    found = sorted(p for p in (ws / "cache" / "targets").iterdir() if p.is_dir())
    if not found:
        raise RuntimeError(f"{ws}: no target store under cache/targets")
    return found[0]


def _foreign(store, name: str) -> None:
    """Rewrite shard ``name`` as a shard of another store (another key in its header), its
    byte count recorded in the manifest, as a copy from another model's store would be."""
    f = store / name
    with safe_open(str(f), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not iterable)
        meta = dict(fh.metadata())
    meta["store_key"] = "0" * 16
    save_file(tensors, str(f), metadata=meta)
    manifest = json.loads((store / "store.json").read_text())
    for rec in manifest["shards"]:
        if rec["file"] == name:
            rec["bytes"] = f.stat().st_size
    (store / "store.json").write_text(json.dumps(manifest))


@fault("store-shard-damaged", "corrupt", variants=2)
def shard_damaged(ctx: Context, trial: int) -> Trial:
    """a shard of the shared target store cut short (trial 0) or replaced by a shard of another
    store (trial 1): the train stage fails naming the shard and saying to delete the store;
    after deleting it `dvc repro --no-run-cache` rebuilds it and trains to the reference
    checkpoint"""
    ws = ctx.clone("store")
    store = _store(ws)
    name = "shard-00001.safetensors"
    if trial % 2 == 0:
        data = (store / name).read_bytes()
        (store / name).write_bytes(data[: len(data) // 2])
        what = f"{name} cut to half its bytes"
    else:
        _foreign(store, name)
        what = f"{name} replaced by a shard of another store"
    W.forget(ws, STAGES["train"])
    r = W.dvc(ws, "repro", "--no-run-cache")
    out = (r.stdout or "") + (r.stderr or "")
    err = next((ln.strip() for ln in out.splitlines() if name in ln), "")
    clear = r.returncode != 0 and "delete" in err and "Traceback" not in out
    how = f"{what}: rerun exit {r.returncode}: {err[:220]!r}"
    if not clear:
        return Trial(False, False, how + f"; output: {out[-400:]}")
    shutil.rmtree(store)
    return _final(
        ctx,
        ws,
        how + "; store deleted, `dvc repro --no-run-cache`",
        W.dvc(ws, "repro", "--no-run-cache"),
    )


@fault("kill-target-store", "kill")
def kill_store(ctx: Context, trial: int) -> Trial:
    """kill -9 of the train stage halfway through writing the third shard of its target store
    (built afresh): only whole shards are published and listed; `dvc repro --no-run-cache`
    resumes the build at the third shard and every output equals the uninterrupted run"""
    ws = ctx.clone("kill-store")
    shutil.rmtree(ws / "cache" / "targets")
    W.forget(ws, STAGES["train"])
    r = W.dvc(
        ws,
        "repro",
        "--no-run-cache",
        "-s",
        STAGES["train"],
        PYTHONPATH=str(INJECT),
        MC_FAULT_KILL_SAVE="cache/targets/:3",
    )
    store = _store(ws)
    manifest = json.loads((store / "store.json").read_text())
    listed = [rec["file"] for rec in manifest["shards"]]
    shards = sorted(p.name for p in store.glob("shard-*.safetensors"))
    whole = listed == shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    how = (
        f"killed writing the third shard: stage exit {r.returncode}; shards published "
        f"{shards}, listed {listed}, complete={manifest['complete']}"
    )
    if r.returncode == 0 or not whole or manifest["complete"]:
        return Trial(False, False, how)
    r = W.dvc(ws, "repro", "--no-run-cache")
    out = (r.stdout or "") + (r.stderr or "")
    said = next((ln.strip() for ln in out.splitlines() if "resuming the target store" in ln), "")
    how += f"; rerun says {said!r}"
    if not said:
        return Trial(False, False, how + f"; output: {out[-400:]}")
    return _final(ctx, ws, how, r)
