"""Stage ``train@<arch>-<rate>``: train one compressor against the frozen base model.

Reads ``models/base/<arch>`` and ``data/train``; writes ``models/compressors/<arch>-r<rate>/``
(``mc_core.checkpoint`` layout), ``reports/train/<arch>-<rate>.json`` (final metrics) and
``reports/curves/<arch>-<rate>.csv`` (per-step curves, a DVC plot). Logs one MLflow run for the
cell (params, per-step curves, metrics, the curve file, lineage tags).

The teacher's outputs do not depend on the rate, so they are computed once per (base model,
data) and shared by every rate of the arch through ``cache/teacher/`` (file-locked: concurrent
cells wait for the first one instead of recomputing). Training state is checkpointed under
``cache/train-state/<cell>/<settings hash>/`` so an interrupted stage resumes, and changed
params start afresh.

Usage: ``python -m tasks.train --arch tiny-llava --rate 0.9``
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from tasks import common, tracking

PARAMS = ("train", "tracking")
CURVE_FIELDS = ("step", "loss", "kl", "entropy", "collapse", "grad_norm", "epoch",
                "samples_per_s")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _input_hashes(arch: str) -> dict[str, str]:
    """DVC hashes of the stage's data inputs (from dvc.lock), else content hashes."""
    paths = [str(common.base_dir(arch)), str(common.DATA_TRAIN)]
    found = tracking.dvc_hashes(paths)
    for p in paths:
        found.setdefault(f"dvc.{p}", "sha256:" + tracking.checkpoint_hash(p)[:32])
    return found


def teacher_cache(model, processor, dataset, *, arch: str, needs, inputs: dict, cfg):
    """Load or build (once, under a file lock) the rate-independent teacher cache."""
    from mc_core import train as mtrain

    if not cfg.cache_teacher:
        return None
    path = Path("cache/teacher") / f"{arch}-{_key(inputs, sorted(needs))}"
    with tracking.file_lock(path.parent / f"{path.name}.lock"):  # names may contain dots
        if (path / "cache.json").is_file():
            print(f"train: teacher cache {path} (shared across rates)", flush=True)
            return mtrain.load_teacher_cache(path)
        cache = mtrain.build_teacher_cache(model, processor, dataset, needs=needs,
                                           batch_size=cfg.teacher_batch, device=cfg.device,
                                           progress=cfg.progress)
        mtrain.save_teacher_cache(cache, path)
        return cache


def main(argv: list[str] | None = None) -> None:
    """Train the cell, save the checkpoint and its reports, track the run."""
    p = common.load_params(PARAMS, who="tasks.train")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv)
    cfg = p.train.to_train_config()  # validated before anything heavy is loaded

    from mc_core import checkpoint, zoo
    from mc_core import train as mtrain
    from mc_core.compressors import build
    from mc_core.data import schema

    rate_s = common.config.format_rate(rate)
    model, processor = zoo.load(common.base_dir(arch))
    family = zoo.info(common.base_dir(arch)).get("family")
    dataset = schema.load(common.DATA_TRAIN)
    inputs = _input_hashes(arch)
    needs = build(cfg.method, rate=rate, dim=8).needs  # dim is irrelevant to `needs`

    run_id = tracking.start_cell_run(
        p.tracking.experiment, arch, rate_s,
        params={"arch": arch, "rate": rate, **common.flat("train", p.train.model_dump())},
        tags={"family": str(family)})
    rows: list[dict] = []
    steps = tracking.StepLogger(run_id, prefix="train/")

    def on_step(step: int, metrics: dict) -> None:
        rows.append({"step": step, **metrics})
        steps(step, metrics)

    t0 = time.perf_counter()
    try:
        cache = teacher_cache(model, processor, dataset, arch=arch, needs=needs, inputs=inputs,
                              cfg=cfg)
        state = common.state_dir(arch, rate) / _key(cfg.fingerprint(), rate, inputs,
                                                     len(dataset))
        compressor = mtrain.train(cfg, model, processor, dataset, rate=rate, out_dir=state,
                                  callbacks=[on_step], cache=cache)
        steps.flush()
        out = common.compressor_dir(arch, rate)
        tmp = common.fresh_dir(out)
        # Deterministic meta only: the registry identifies checkpoints by content hash.
        meta = {"arch": arch, "family": family, "rate": rate, "train": cfg.fingerprint(),
                "inputs": inputs}
        checkpoint.save_compressor(tmp / "ckpt", compressor, meta=meta)
        common.publish_dir(tmp / "ckpt", out)
        tmp.rmdir()
        # The state only serves to resume an interrupted run: a finished one must not be
        # "resumed" by a later rerun (DVC reruns this stage when the code changed).
        shutil.rmtree(state, ignore_errors=True)
        final = rows[-1] if rows else {}
        report = {"arch": arch, "rate": rate, "steps": final.get("step", 0),
                  "train_s": round(time.perf_counter() - t0, 2),
                  **{k: final[k] for k in ("loss", "kl", "entropy", "collapse") if k in final}}
        common.write_json(common.cell_file("train", arch, rate), report)
        curve = common.write_csv(common.cell_file("curves", arch, rate, ".csv"), rows,
                                 CURVE_FIELDS)
        tracking.log_metrics(run_id, {f"final/{k}": v for k, v in report.items()
                                      if k not in ("arch", "rate")})
        tracking.log_artifacts(run_id, curve, "curves")
        tracking.set_tags(run_id, {"ckpt_sha256": tracking.checkpoint_hash(out)})
        tracking.end_run(run_id)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    print(f"train: wrote {out} ({report['steps']} steps, {report['train_s']} s)", flush=True)


if __name__ == "__main__":
    main()
