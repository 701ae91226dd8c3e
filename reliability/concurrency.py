"""Two ``dvc repro`` on one workspace at once; four processes registering at once.

Two repros: a clone where ``train@<cell>`` never ran (``workspace.forget``; run-cache
bypassed, so the stage really runs) gets two ``dvc repro --no-run-cache`` started one second apart.
Expected: each either completes or fails at once with DVC's lock message; outputs equal the
reference's; a third ``dvc repro`` then has nothing to do.

Four registrations: four processes register four cells into one fresh (migrated) SQLite
store, each also registering its checkpoint under one shared name, and four more register
one identical checkpoint at once (tests/test_registry.py has the first half). Expected: one
version per cell, versions 1..4 of the shared name with ``champion`` on the best score, and
exactly one version for the identical checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from reliability import workspace as W
from reliability.core import Context, Trial, fault
from reliability.workspace import STAGES

LOCK_WORDS = ("Unable to acquire lock", "is busy", "lock")


@fault("two-dvc-repro", "concurrency", ci=True)
def two_repro(ctx: Context, trial: int) -> Trial:
    """two `dvc repro --no-run-cache` at once on one workspace with a stale cell: one waits or
    fails with DVC's lock message, the other completes; outputs identical to the reference,
    a third repro runs nothing"""
    ref = ctx.reference()
    ws = ctx.clone("two-repro")
    W.forget(ws, STAGES["train"])
    a = W.spawn([str(W.BIN / "dvc"), "repro", "--no-run-cache"], ws)
    time.sleep(1.0 + ctx.rng("two", trial).uniform(0, 2))
    b = W.spawn([str(W.BIN / "dvc"), "repro", "--no-run-cache"], ws)
    codes = [a.wait(timeout=900), b.wait(timeout=900)]
    logs = [p.log_path.read_text(errors="replace") for p in (a, b)]
    failed = [lg for c, lg in zip(codes, logs, strict=True) if c != 0]
    clear = all(any(w in lg for w in LOCK_WORDS) and "Traceback" not in lg for lg in failed)
    want = W.snapshot(ref, W.all_outs(ref))
    got = W.snapshot(ws, W.all_outs(ref))
    diff = [p for p in want if got.get(p) != want[p]]
    third = W.dvc(ws, "repro")
    again = W.ran((third.stdout or "") + (third.stderr or ""))
    lock_line = next(
        (ln.strip() for lg in failed for ln in lg.splitlines() if any(w in ln for w in LOCK_WORDS)),
        "",
    )
    how = (
        f"exit codes {codes}"
        + (
            f", the loser said {lock_line[:160]!r}"
            if failed
            else " (the second waited for the first)"
        )
        + f"; outputs {'identical to the reference' if not diff else f'DIFFER {diff}'}; "
        f"third repro ran {again or 'nothing'}"
    )
    ok = 0 in codes and clear and not diff and third.returncode == 0 and not again
    return Trial(ok, bool(diff), how)


_REGISTER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tasks import tracking
    i, root, uri = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    d = root / f"ck{i}"
    d.mkdir()
    (d / "compressor.safetensors").write_bytes(b"w" + i.encode())
    (d / "compressor.json").write_text("{}")
    run = tracking.start_cell_run("exp", "tiny-llava", "0." + i, params={"i": i}, uri=uri)
    r = tracking.register_checkpoint(f"cell-{i}", d, run_id=run, score=0.5, metric="acc_avg",
                                     uri=uri)
    r2 = tracking.register_checkpoint("shared", d, run_id=run, score=float(i),
                                      metric="acc_avg", uri=uri)
    same = root / "same"
    r3 = tracking.register_checkpoint("same", same, run_id=run, score=0.5, metric="acc_avg",
                                      uri=uri)
    tracking.end_run(run, uri=uri)
    print(r.version, r2.version, r3.version)
""")


@fault("four-registrations", "concurrency", ci=True, reference=False)
def four_registrations(ctx: Context, trial: int) -> Trial:
    """four processes register four cells, four checkpoints under one shared name and one
    identical checkpoint, all at once, into one SQLite store: one version per cell, shared
    versions 1..4 with champion on the best, one version of the identical checkpoint"""
    import mc_registry

    root = ctx.scratch("four")
    uri = mc_registry.migrate(f"sqlite:///{root / 'mlflow.db'}")  # migrated before the fan-out
    (root / "same").mkdir()
    (root / "same" / "compressor.safetensors").write_bytes(b"identical")
    (root / "same" / "compressor.json").write_text("{}")
    env = {**W.env(root), "PYTHONPATH": str(W.ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, str(i), str(root), uri],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, 5)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    bad = [err[-300:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
    c = mc_registry.client(uri)
    cells = [
        [str(v.version) for v in c.search_model_versions(f"name = 'cell-{i}'")] for i in range(1, 5)
    ]
    shared = c.search_model_versions("name = 'shared'")
    same = c.search_model_versions("name = 'same'")
    best = max(shared, key=lambda v: float(v.tags["score"])).version if shared else None
    champ = c.get_model_version_by_alias("shared", "champion").version if shared else None
    best, champ = str(best), str(champ)
    runs = c.search_runs([c.get_experiment_by_name("exp").experiment_id])
    ok = (
        not bad
        and all(v == ["1"] for v in cells)
        and sorted(int(v.version) for v in shared) == [1, 2, 3, 4]
        and champ == best
        and len(same) == 1
        and len(runs) == 4
        and all(r.info.status == "FINISHED" for r in runs)
    )
    how = (
        f"cells' versions {cells}; shared versions {sorted(int(v.version) for v in shared)}, "
        f"champion v{champ} (best v{best}); identical checkpoint -> {len(same)} version(s); "
        f"{len(runs)} runs FINISHED" + (f"; failures: {bad}" if bad else "")
    )
    lost = any(v != ["1"] for v in cells) or len(shared) != 4 or len(same) != 1 or len(runs) != 4
    return Trial(ok, lost and not bad, how)
