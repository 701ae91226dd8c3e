"""Stage ``train@<arch>-<rate>``: train the ``train.method`` compressor against the frozen base.

Reads ``models/base/<arch>`` and ``data/train``; writes ``models/compressors/<arch>-r<rate>/``
(``mc_core.compressors.checkpoint`` layout), ``reports/train/<arch>-<rate>.json`` (final metrics)
and
``reports/curves/<arch>-<rate>.csv`` (per-step curves, a DVC plot). Logs one MLflow run for the
cell (params, per-step curves, metrics, the curve file, lineage tags).

The frozen model's distillation targets do not depend on the rate, so they are computed once
per (base model, data) and shared by every rate of the arch through ``cache/targets/``
(file-locked: concurrent cells wait for the first one instead of recomputing). Training state
is checkpointed under ``cache/train-state/<cell>/<settings hash>/`` so an interrupted stage
resumes, and changed params start afresh.

Several GPUs: ``train.distributed.nproc_per_node`` > 1 re-executes this stage under torchrun
(``mc_core.training.distributed``), one process per GPU training data-parallel; rank 0 alone writes
the
outputs, the curve and MLflow, the other ranks train along. The target cache is built once (the
first rank to take its lock) and read by the others. Before training, the estimated peak device
memory of a step (``mc_core.training.memory``) is printed and logged as ``memory/*_gib``.

Stage ``train-any@<arch>`` (``--rate any``) trains the arch's any-rate compressor the same way:
the recipe ``train.for_any`` (``train.any_rate``: each step draws its rate from
``train.any_rate.rates``), into ``models/compressors/<arch>-any/`` and
``reports/{train,curves}/<arch>-any.*``; the targets are the same shared store.

Usage: ``python -m tasks.train --arch tiny-llava --rate 0.9`` (``--rate any``)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tasks import cells, common, lineage, tracking

PARAMS = ("train", "tracking")
CURVE_FIELDS = ("step", "loss", "kl", "entropy", "collapse", "grad_norm", "epoch", "samples_per_s")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _input_hashes(arch: str) -> dict[str, str]:
    """DVC hashes of the stage's data inputs (from dvc.lock), else content hashes."""
    paths = [str(cells.base_dir(arch)), str(common.DATA_TRAIN)]
    found = lineage.dvc_hashes(paths)
    for p in paths:
        found.setdefault(f"dvc.{p}", "sha256:" + lineage.checkpoint_hash(p)[:32])
    return found


def _input_stamps(arch: str) -> str:
    """Digest of the size and mtime of every input file: changes with a hand edit of the data
    or the base model that dvc.lock (hence ``inputs``) has not recorded yet."""
    from mc_core.data.assemble import file_stamp

    files = sorted(
        f
        for p in (cells.base_dir(arch), common.DATA_TRAIN)
        for f in Path(p).rglob("*")
        if f.is_file()
    )
    return _key(file_stamp(files))


def target_provenance(*, arch: str, needs, inputs: dict, cfg) -> dict:
    """Everything the distillation targets depend on (the cache's key and its recorded info)."""
    import torch
    import transformers

    from mc_core import runtime
    from mc_core.training import targets

    return {
        "arch": arch,
        "inputs": inputs,
        "files": _input_stamps(arch),
        "needs": sorted(needs),
        "device": runtime.resolve_device(cfg.device).type,
        "dtype": str(runtime.resolve_dtype(cfg.dtype, runtime.resolve_device(cfg.device))),
        "target_batch": cfg.target_batch,
        "target_topk": cfg.target_topk,
        "targets": cfg.targets,
        "code": targets.TARGETS_VERSION,
        "visual_tokens": cfg.visual_tokens,
        "shard_dialogues": cfg.shard_dialogues,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def target_cache(model, processor, dataset, *, arch: str, needs, inputs: dict, cfg):
    """Load or build (once, under a file lock) the rate-independent distillation targets: a
    target store (``mc_core.training.store``) under ``cache/targets/``, built shard by shard
    and read per step, so host memory does not grow with the dataset.

    A store whose recorded provenance differs from this run's (copied from elsewhere, built by
    older code) is reported and rebuilt, never used; an interrupted build resumes.
    """
    from mc_core.training import targets

    if not cfg.cache_targets:
        return None
    info = target_provenance(arch=arch, needs=needs, inputs=inputs, cfg=cfg)
    path = Path("cache/targets") / f"{arch}-{_key(info)}"
    with lineage.file_lock(path.parent / f"{path.name}.lock"):  # names may contain dots
        have = targets.target_cache_info(path)
        if have == info:
            print(f"train: target store {path} (shared across rates)", flush=True)
            return targets.load_target_cache(path, topk=cfg.target_topk)
        if have is not None:
            diff = sorted(k for k in set(info) | set(have) if have.get(k) != info.get(k))
            print(
                f"train: target store {path} was built from other {diff} than this run: "
                "rebuilding it",
                flush=True,
            )
            shutil.rmtree(path)
        elif (path / "store.json").is_file():
            print(f"train: resuming the target store build in {path}", flush=True)
        return targets.build_target_store(
            model,
            processor,
            dataset,
            path,
            info=info,
            needs=needs,
            batch_size=cfg.target_batch,
            device=cfg.device,
            progress=cfg.progress,
            topk=cfg.target_topk,
            dtype=cfg.dtype,
            targets=cfg.targets,
            visual_tokens=cfg.visual_tokens,
            shard_dialogues=cfg.shard_dialogues,
        )


_CURVE_LOG = "curve.jsonl"  # beside mc_core.training.loop's train_state.json in the state folder


def _resumed_rows(state: Path) -> list[dict]:
    """Curve rows of an interrupted run up to its last checkpoint (rows after it are redone);
    also rewrites the state's curve log to them. Empty for a fresh run."""
    info, log = state / "train_state.json", state / _CURVE_LOG
    rows: list[dict] = []
    try:
        last = json.loads(info.read_text()).get("step", 0) if info.is_file() else None
    except (ValueError, AttributeError):  # damaged: mc_core.training.loop reports it
        last = None
    if last is not None:
        print(f"train: resuming the interrupted run from step {last} ({state})", flush=True)
        for line in log.read_text().splitlines() if log.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line the kill cut
                break
            if row.get("step", 0) <= last:
                rows.append(row)
    state.mkdir(parents=True, exist_ok=True)
    common.write_text(state / _CURVE_LOG, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _train_extra_seeds(
    seeds, cfg, arch, rate, model, processor, dataset, cache, meta, *, lead: bool = True
) -> None:
    """Seeds 2..n of the same recipe into the cell's seeds folder (always written, empty for
    one seed: it is a DVC out); tasks.evaluate reports mean +- sd over them. The other ranks
    of a distributed run (``lead`` False) train along and write nothing."""
    from mc_core.compressors import checkpoint
    from mc_core.training import loop as mtrain

    inputs = meta["inputs"]
    folder = common.staged_dir(cells.seeds_dir(arch, rate)) if lead else contextlib.nullcontext()
    with folder as extra:
        for k in range(1, seeds):
            cfg_k = cfg.model_copy(update={"seed": cfg.seed + k})
            state_k = cells.state_dir(arch, rate) / _key(
                cfg_k.fingerprint(), rate, inputs, len(dataset)
            )
            comp_k = mtrain.train(
                cfg_k, model, processor, dataset, rate=_lib_rate(rate), out_dir=state_k, cache=cache
            )
            if lead:
                checkpoint.save_compressor(
                    extra / f"seed-{cfg_k.seed}",
                    comp_k,
                    meta={**meta, "train": cfg_k.fingerprint()},
                )
                shutil.rmtree(state_k, ignore_errors=True)


def _lib_rate(rate: float | str) -> float | None:
    """The library's ``rate`` argument: None for an any-rate compressor (its nominal rate,
    ``mc_core.training.rates.nominal_rate``), the cell's rate otherwise."""
    return None if rate == cells.ANY else rate


def _relaunch(cfg, argv: list[str] | None) -> bool:
    """Run this stage as ``train.distributed.nproc_per_node`` torchrun processes and wait for
    them (so ``dvc repro`` needs no other command); False when this process trains itself:
    one process, or already one of torchrun's ranks."""
    from mc_core.training import distributed

    nproc = cfg.distributed.nproc_per_node
    if nproc == 1 or distributed.launched():
        return False
    cmd = distributed.torchrun_argv(nproc, "tasks.train", sys.argv[1:] if argv is None else argv)
    print(f"train: {nproc} processes: {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise SystemExit(code)  # the ranks printed why
    return True


def _plan_step(cfg, model, cache, rate: float, run_id: str):
    """Print (and log) the micro-batch of each forward and the estimated peak device memory of
    a step, before the first one; returns ``cfg`` with ``micro_batch: auto`` resolved."""
    from mc_core import runtime
    from mc_core.compressors import build
    from mc_core.runtime import token_dim
    from mc_core.training import distributed, memory
    from mc_core.training.loop import auto_micro_batch

    if cache is None:
        return cfg
    if rate == cells.ANY:  # the step of the lowest rate keeps the most tokens: plan for it
        rate = min(cfg.rates)
    comp = build(cfg.method, rate=rate, dim=token_dim(model), **cfg.build_kwargs())
    per_rank = math.ceil(cfg.batch_size / distributed.world()[1])
    chosen, _ = auto_micro_batch(cfg, model, comp, cache, world=distributed.world()[1])
    micro = chosen or min(cfg.micro_batch or per_rank, per_rank)
    how = "auto: the largest that fits" if chosen else "train.micro_batch"
    print(f"train: micro-batch {micro} of {per_rank} dialogues per step ({how})", flush=True)
    tracking.log_metrics(run_id, {"micro_batch": float(micro)})
    device = runtime.resolve_device(cfg.device)
    shapes = cache.step_shapes(comp.kept)
    est = memory.estimate(
        model,
        batch_size=micro,
        seq_len=shapes["seq_len"],
        answer_tokens=shapes["answer_tokens"],
        images=micro * shapes["images"],
        dtype=runtime.resolve_dtype(cfg.dtype, device),
        generator_params=sum(p.numel() for p in comp.parameters()),
        visual_tokens=shapes["visual_tokens"],
        target_topk=cfg.target_topk,
        activation_checkpointing=cfg.activation_checkpointing,
        vision=cfg.visual_tokens,
    )
    print(
        f"train: estimated device memory per process on {device}: {memory.format_estimate(est)}",
        flush=True,
    )
    parts = ("weights", "activations", "logits", "generator", "transient", "total")
    tracking.log_metrics(run_id, {f"memory/{k}_gib": est[k] / 1024**3 for k in parts})
    return cfg.model_copy(update={"micro_batch": micro}) if chosen else cfg


def main(argv: list[str] | None = None) -> None:
    """Train the cell (in ``train.distributed.nproc_per_node`` processes), save the checkpoint
    and its reports, track the run."""
    p = common.load_params(PARAMS, who="tasks.train")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv, any_rate=True)
    # The cell's validated recipe (shared train keys, then train.overrides; the any-rate
    # compressor's then train.any_rate), before anything heavy is loaded.
    cfg = p.train.for_any(arch) if rate == cells.ANY else p.train.for_cell(arch, rate)
    if _relaunch(cfg, argv):
        return

    from mc_core import runtime
    from mc_core.training import distributed

    distributed.init(cfg.distributed.backend, runtime.resolve_device(cfg.device))
    try:
        _train_cell(p, cfg, arch, rate)
    finally:
        distributed.shutdown()


def _follow(p, cfg, arch, rate, model, processor, dataset, state, needs, inputs) -> None:
    """A rank other than 0: the same training calls (they meet in the all-reduces), no
    outputs, logs or tracking; resumes from the state rank 0 checkpoints."""
    from mc_core.training import loop as mtrain

    cache = target_cache(model, processor, dataset, arch=arch, needs=needs, inputs=inputs, cfg=cfg)
    mtrain.train(cfg, model, processor, dataset, rate=_lib_rate(rate), out_dir=state, cache=cache)
    meta = {"inputs": inputs}
    _train_extra_seeds(
        p.train.seeds, cfg, arch, rate, model, processor, dataset, cache, meta, lead=False
    )


def _train_cell(p, cfg, arch: str, rate: float) -> None:
    from mc_core.compressors import checkpoint, get_class
    from mc_core.data import schema
    from mc_core.models import zoo
    from mc_core.training import distributed
    from mc_core.training import loop as mtrain

    rate_s = cells.format_rate(rate)
    model, processor = zoo.load(cells.base_dir(arch))
    family = zoo.info(cells.base_dir(arch)).get("family")
    dataset = schema.load(common.DATA_TRAIN)
    inputs = _input_hashes(arch)
    needs = get_class(cfg.method).needs
    if distributed.world()[0] != 0:
        state = cells.state_dir(arch, rate) / _key(cfg.fingerprint(), rate, inputs, len(dataset))
        _follow(p, cfg, arch, rate, model, processor, dataset, state, needs, inputs)
        return

    run_id = tracking.start_cell_run(
        p.tracking.experiment,
        arch,
        rate_s,
        params={"arch": arch, "rate": rate, **common.flat("train", cfg.model_dump())},
        tags={"family": str(family), "method": cfg.method},
    )
    state = cells.state_dir(arch, rate) / _key(cfg.fingerprint(), rate, inputs, len(dataset))
    rows = _resumed_rows(state)  # an interrupted run's curve up to its last checkpoint
    steps = tracking.StepLogger(run_id, prefix="train/")
    for row in rows:
        steps(row["step"], {k: v for k, v in row.items() if k != "step"})

    def on_step(step: int, metrics: dict) -> None:
        rows.append({"step": step, **metrics})
        steps(step, metrics)
        with open(state / _CURVE_LOG, "a") as fh:  # resume state, not a published output
            fh.write(json.dumps(rows[-1]) + "\n")

    t0 = time.perf_counter()
    try:
        cache = target_cache(
            model, processor, dataset, arch=arch, needs=needs, inputs=inputs, cfg=cfg
        )
        cfg = _plan_step(cfg, model, cache, rate, run_id)
        compressor = mtrain.train(
            cfg,
            model,
            processor,
            dataset,
            rate=_lib_rate(rate),
            out_dir=state,
            callbacks=[on_step],
            cache=cache,
        )
        steps.flush()
        out = cells.compressor_dir(arch, rate)
        # Deterministic meta only: the registry identifies checkpoints by content hash.
        meta = {
            "arch": arch,
            "family": family,
            "rate": rate,
            "train": cfg.fingerprint(),
            "inputs": inputs,
        }
        checkpoint.save_compressor(out, compressor, meta=meta)
        # The state only serves to resume an interrupted run: a finished one must not be
        # "resumed" by a later rerun (DVC reruns this stage when the code changed).
        shutil.rmtree(state, ignore_errors=True)
        # train.seeds > 1: the same recipe with the next seeds, for the spread over seeds
        # (tasks.evaluate reports mean +- sd); always written, empty for one seed (a DVC out).
        _train_extra_seeds(p.train.seeds, cfg, arch, rate, model, processor, dataset, cache, meta)
        final = rows[-1] if rows else {}
        report = {
            "arch": arch,
            "rate": rate,
            "steps": final.get("step", 0),
            "train_s": round(time.perf_counter() - t0, 2),
            **{k: final[k] for k in ("loss", "kl", "entropy", "collapse") if k in final},
        }
        common.write_json(cells.cell_file("train", arch, rate), report)
        curve = common.write_csv(cells.cell_file("curves", arch, rate, ".csv"), rows, CURVE_FIELDS)
        tracking.log_metrics(
            run_id, {f"final/{k}": v for k, v in report.items() if k not in ("arch", "rate")}
        )
        tracking.log_artifacts(run_id, curve, "curves")
        tracking.set_tags(run_id, {"ckpt_sha256": lineage.checkpoint_hash(out)})
        tracking.end_run(run_id)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    print(f"train: wrote {out} ({report['steps']} steps, {report['train_s']} s)", flush=True)


if __name__ == "__main__":
    with common.stage("train"):
        main()
