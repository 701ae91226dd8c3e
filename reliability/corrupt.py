"""Corrupted state: ``dvc.lock``, ``params.yaml`` with wrong types, a hand-edited ``models/``
folder, a target cache from other inputs, a damaged training state.

Each is detected with a message naming the file (and the key or what differs) and saying what
to run; the documented command then restores outputs identical to the reference run.
"""

from __future__ import annotations

import json
import shutil

import yaml

from reliability import registry_state as R
from reliability import workspace as W
from reliability.core import Context, Trial, fault
from reliability.workspace import STAGES


def _final(ctx: Context, ws, how: str, r) -> Trial:
    """The recovery's verdict: it succeeded, outputs and registry equal the reference."""
    ref = ctx.reference()
    want = W.snapshot(ref, W.all_outs(ref))
    got = W.snapshot(ws, W.all_outs(ref))
    diff = [p for p in want if got.get(p) != want[p]]
    reg = R.check_registry(ws, ref)
    out = (r.stdout or "") + (r.stderr or "")
    how += (
        f"; exit {r.returncode}, ran {W.ran(out) or 'nothing'}; outputs "
        f"{'identical to the reference' if not diff else f'DIFFER {diff}'}; {reg.how}"
    )
    return Trial(r.returncode == 0 and not diff and reg.ok, bool(diff) or reg.lost, how)


@fault("dvc-lock-corrupt", "corrupt", variants=2)
def lock_corrupt(ctx: Context, trial: int) -> Trial:
    """dvc.lock cut at a random byte: `dvc repro` refuses naming dvc.lock, the flow's DVC
    wrapper adds what to run; `git checkout dvc.lock` (or deleting it: DVC restores from its
    caches) then gives the reference outputs"""
    from flows import workspace as fws

    ws = ctx.clone("lock")
    text = (ws / "dvc.lock").read_text()
    cut = ctx.rng("lock", trial).randrange(len(text) // 4, len(text) - 10)
    (ws / "dvc.lock").write_text(text[:cut] + "\n  ][ garbage: [\n")
    r = W.dvc(ws, "repro")
    out = (r.stdout or "") + (r.stderr or "")
    dvc_says = next((ln.strip() for ln in out.splitlines() if "dvc.lock" in ln), "")
    try:
        fws.stages(ws)
        hint = ""
    except fws.DvcStageError as err:
        hint = str(err).strip().splitlines()[-1]
    how = (
        f"dvc.lock cut at byte {cut}: `dvc repro` exit {r.returncode}, {dvc_says[:100]!r}; "
        f"flow wrapper: {hint[:200]!r}"
    )
    if r.returncode == 0 or "dvc.lock" not in dvc_says or "git checkout dvc.lock" not in hint:
        return Trial(False, False, how)
    if trial % 2 == 0:
        W.check(W.run(["git", "checkout", "dvc.lock"], ws), "git checkout dvc.lock")
        return _final(ctx, ws, how + "; `git checkout dvc.lock` + `dvc repro`", W.dvc(ws, "repro"))
    (ws / "dvc.lock").unlink()
    return _final(ctx, ws, how + "; `rm dvc.lock` + `dvc repro`", W.dvc(ws, "repro"))


@fault("params-wrong-types", "corrupt", ci=True)
def params_types(ctx: Context, trial: int) -> Trial:
    """params.yaml with train.lr='fast' and evaluate.batch_size='two': `dvc repro`
    fails at the first stage reading them, naming every bad key and `python -m tasks.params`,
    no traceback; dvc.lock unchanged; restoring params.yaml, `dvc repro` gives the reference"""
    ws = ctx.clone("params")
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["train"]["lr"], p["evaluate"]["batch_size"] = "fast", "two"
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    lock = (ws / "dvc.lock").read_text()
    r = W.dvc(ws, "repro")
    out = (r.stdout or "") + (r.stderr or "")
    keys = ("train.lr='fast'", "evaluate.batch_size='two'")
    clear = (
        r.returncode != 0
        and all(k in out for k in keys)
        and "python -m tasks.params" in out
        and "Traceback" not in out
    )
    err = next((ln.strip() for ln in out.splitlines() if "train.lr" in ln), "")
    how = (
        f"`dvc repro` exit {r.returncode}: {err[:160]!r}, names "
        f"{[k for k in keys if k in out]}, says `python -m tasks.params`: "
        f"{'python -m tasks.params' in out}, traceback: {'Traceback' in out}"
    )
    intact = (ws / "dvc.lock").read_text() == lock
    if not clear or not intact:
        return Trial(False, not intact, how + f"; dvc.lock {'unchanged' if intact else 'CHANGED'}")
    W.check(W.run(["git", "checkout", "params.yaml"], ws), "git checkout params.yaml")
    return _final(
        ctx,
        ws,
        how + "; dvc.lock unchanged; `git checkout params.yaml` + `dvc repro`",
        W.dvc(ws, "repro"),
    )


@fault("models-hand-edited", "corrupt", variants=2)
def models_edited(ctx: Context, trial: int) -> Trial:
    """bytes of models/compressors/<cell>/compressor.safetensors changed by hand (trial 0: in
    the weights, still loadable; trial 1: the header, unloadable): `dvc status` names the
    stage and folder, loading a broken one names the file; `dvc repro` restores the reference
    and registers nothing new"""
    ws = ctx.clone("models")
    f = ws / "models" / "compressors" / f"{W.ARCH}-r0.5" / "compressor.safetensors"
    data = bytearray(f.read_bytes())
    where = len(data) - 8 if trial % 2 == 0 else 12
    data[where] ^= 0xFF
    f.chmod(0o644)
    f.write_bytes(bytes(data))
    st = W.dvc(ws, "status")
    status = (st.stdout or "") + (st.stderr or "")
    named = STAGES["train"] in status and "modified" in status
    how = f"byte {where} of {f.relative_to(ws)} flipped: `dvc status` names it: {named}"
    if trial % 2 == 1:
        r = W.python(ws, "-m", "tasks.evaluate", "--arch", W.ARCH, "--rate", "0.5")
        out = (r.stdout or "") + (r.stderr or "")
        err = next((ln.strip() for ln in out.splitlines() if "corrupt" in ln), "")
        named = named and r.returncode != 0 and str(f.name) in err and "Traceback" not in out
        how += f"; tasks.evaluate exit {r.returncode}: {err[:160]!r}"
    if not named:
        return Trial(False, False, how + f"; status: {status[-300:]}")
    return _final(ctx, ws, how + "; `dvc repro`", W.dvc(ws, "repro"))


@fault("target-cache-foreign", "corrupt", variants=2)
def cache_foreign(ctx: Context, trial: int) -> Trial:
    """the shared target cache replaced by one built from other inputs (trial 0: other data
    hashes recorded; trial 1: a cache without provenance, as older code wrote): the train
    stage says so and rebuilds it; the checkpoint equals the reference's"""
    ws = ctx.clone("cache")
    # Every cache of the workspace (forced reruns of prepare left more than one) is replaced.
    for cache in sorted(p for p in (ws / "cache" / "targets").iterdir() if p.is_dir()):
        doc = json.loads((cache / "store.json").read_text())
        info = doc["description"]["info"]
        if trial % 2 == 0:
            info["inputs"] = {k: "0" * 32 for k in info["inputs"]}
        else:
            doc["description"]["info"] = {}
        (cache / "store.json").write_text(json.dumps(doc))
    r = W.python(ws, "-m", "tasks.train", "--arch", W.ARCH, "--rate", "0.5")
    out = (r.stdout or "") + (r.stderr or "")
    said = next((ln.strip() for ln in out.splitlines() if "rebuilding" in ln), "")
    how = f"{'other inputs recorded' if trial % 2 == 0 else 'no provenance'}: train says {said!r}"
    if not said:
        return Trial(False, False, how + f"; output: {out[-400:]}")
    return _final(ctx, ws, how, r)


@fault("train-state-corrupt", "corrupt")
def state_corrupt(ctx: Context, trial: int) -> Trial:
    """the resumable training state of a killed train stage damaged by hand (its JSON cut):
    the rerun fails naming the state folder and saying to delete it; after deleting it the
    rerun trains from the start to the reference checkpoint"""
    ws = ctx.clone("state")
    W.forget(ws, STAGES["train"])
    proc = W.spawn([str(W.BIN / "dvc"), "repro", "--no-run-cache", "-s", STAGES["train"]], ws)
    found = []
    while not found and proc.poll() is None:
        found = sorted((ws / "cache" / "train-state").glob(f"{W.CELL}/*/train_state.json"))
    W.kill9(proc)
    if not found:
        return Trial(False, False, "the train stage finished before a checkpoint was seen")
    state = found[0]
    state.write_text(state.read_text()[:7])
    r = W.dvc(ws, "repro", "--no-run-cache")
    out = (r.stdout or "") + (r.stderr or "")
    err = next((ln.strip() for ln in out.splitlines() if "unreadable training state" in ln), "")
    clear = r.returncode != 0 and str(state.parent.name) in err and "delete" in err
    how = f"train_state.json cut to 7 bytes: rerun exit {r.returncode}: {err[:200]!r}"
    if not clear or "Traceback" in out:
        return Trial(False, False, how + f"; output: {out[-400:]}")
    shutil.rmtree(state.parent)
    return _final(
        ctx,
        ws,
        how + "; folder deleted, `dvc repro --no-run-cache`",
        W.dvc(ws, "repro", "--no-run-cache"),
    )
