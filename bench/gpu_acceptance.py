"""The GPU acceptance run of issue 26: one training step at 7B and TTFT, in one script.

Usage (a GPU machine; `scripts/gpu_acceptance.sh` wraps it with a timeout and copies the result
to ``$OUT``)::

    python -m bench.gpu_acceptance                   # LLaVA-1.5-7B and Qwen2-VL-7B
    python -m bench.gpu_acceptance --tiny --out /tmp # tiny shapes on the CPU: a smoke test

No downloads: each architecture is built from its config with random weights, directly on the
GPU in bfloat16 with SDPA attention (`bench.lvlm`: real widths and layer counts, the family's
offline processor, generated dialogues with images of the real visual-token count: 576 for both).
Per architecture:

1. Training: `mc_core.training.loop.train` at batch ``--batch-size`` (36, the paper's) and rate
   ``--rate`` (0.5) with ``micro_batch="auto"``, for ``--steps`` steps. The peak of the steps
   after the first (``torch.cuda.max_memory_allocated``, reset once the first step is done;
   the target store is built before: `bench.step_memory`) against the estimate the loop's
   "auto" chose its micro-batch by (`mc_core.training.loop.auto_micro_batch`, run on the same
   store just before `train`), and the step time.
2. TTFT through `mc_core.inference.conversation.Conversation` (turn 1's prefill: processor,
   vision tower, compression, LLM prefill to the first token, CUDA-synchronised): all visual
   tokens against rate ``--ttft-rate`` (0.9) with ``pool``, ``sample`` and ``metacompress`` (its
   random init: training changes its weights, not its cost); round-robin rounds after warm-up,
   medians.

The result is written after every architecture (a timeout keeps what finished) to
``<out>/gpu-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.machine import describe_machine, machine_slug
from bench.step_memory import GIB, StepMonitor, bytes_of, weight_bytes

ARCHS = ("llava-1.5-7b", "qwen2-vl-7b")
TTFT_METHODS = ("pool", "sample", "metacompress")
BAND = (0.8, 1.25)  # issue 26: the estimate within this factor of the measurement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (its help documents every knob)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_acceptance", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes (bench.shapes' 'tiny' scale) on the CPU, float32: a smoke test; "
        "defaults then shrink to --batch-size 4, --steps 2, --repeats 1",
    )
    p.add_argument("--batch-size", type=int, default=None, help="dialogues per step (36)")
    p.add_argument("--rate", type=float, default=0.5, help="training rate")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (3; first unmeasured)")
    p.add_argument("--ttft-rate", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=None, help="TTFT rounds (5)")
    p.add_argument("--warmup", type=int, default=1, help="TTFT warm-up rounds")
    p.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="memory micro_batch='auto' may plan for (default: the GPU's free memory less a "
        "margin, the loop's own rule)",
    )
    p.add_argument("--machine", default=None, help="label in the file name (default: GPU name)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    small = args.tiny
    args.batch_size = args.batch_size or (4 if small else 36)
    args.steps = args.steps or (2 if small else 3)
    args.repeats = args.repeats or (1 if small else 5)
    if args.steps < 2:
        raise SystemExit(f"--steps={args.steps}: expected >= 2 (the first step is not measured)")
    for name in ("rate", "ttft_rate"):
        if not 0 < getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: expected (0, 1)")
    return args


def _device(tiny: bool) -> torch.device:
    if tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: the acceptance run measures a GPU (use --tiny for the CPU smoke test)"
        )
    return torch.device("cuda")


def _gib(x: float) -> float | None:
    return round(x / GIB, 4) if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Training step


def _estimate(model, cfg, shapes: dict[str, Any], gen_params: int, micro: int) -> dict[str, Any]:
    """`memory.estimate` at `micro` dialogues per forward (the CPU's "auto": no budget)."""
    from mc_core.training import memory

    return memory.estimate(
        model,
        batch_size=micro,
        seq_len=shapes["seq_len"],
        answer_tokens=shapes["answer_tokens"],
        dtype=next(model.parameters()).dtype,
        attn="sdpa",
        generator_params=gen_params,
        images=micro * shapes["images"],
        visual_tokens=tuple(shapes["visual_tokens"]),
        target_topk=cfg.target_topk,
        activation_checkpointing=cfg.activation_checkpointing,
        vision=cfg.visual_tokens,
    )


def train_step(args, arch: str, model, processor, device) -> dict[str, Any]:
    """`args.steps` steps at batch `args.batch_size`, micro_batch "auto"; the measurements."""
    from bench import lvlm
    from mc_core.compressors import build
    from mc_core.runtime import token_dim
    from mc_core.training.loop import TrainConfig, auto_micro_batch, train
    from mc_core.training.targets import build_target_store

    data = lvlm.dialogues(arch, args.batch_size, seed=0)
    cfg = TrainConfig(
        batch_size=args.batch_size,
        micro_batch="auto",
        max_memory_gib=args.max_memory_gib,
        epochs=args.steps,
        max_steps=args.steps,
        device=str(device),
        dtype="float32" if device.type == "cpu" else "bfloat16",
        progress=False,
        log_every=1,
        checkpoint_every=10**9,
    )
    comp = build(cfg.method, rate=args.rate, dim=token_dim(model), **cfg.build_kwargs())
    gen_params = sum(p.numel() for p in comp.parameters())
    needs = comp.needs
    gen_state = bytes_of(comp.parameters()) * (2 + (cfg.momentum > 0))
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as tmp:
        t0 = time.perf_counter()
        cache = build_target_store(
            model,
            processor,
            data,
            Path(tmp) / "store",
            needs=needs,
            batch_size=cfg.target_batch,
            device=device,
            progress=False,
            topk=cfg.target_topk,
            dtype=cfg.dtype,
            visual_tokens=cfg.visual_tokens,
            shard_dialogues=cfg.shard_dialogues,
        )
        store_s = time.perf_counter() - t0
        # What "auto" picks, by the loop's own function on the same store, before the loop
        # does: the micro-batch and the estimate it was chosen by (CPU: whole batch, no budget).
        shapes = cache.step_shapes(comp.kept)
        micro, est = auto_micro_batch(cfg, model, comp, cache)
        est = est or _estimate(model, cfg, shapes, gen_params, micro)
        del comp
        t0 = time.perf_counter()
        monitor = StepMonitor(device, resident_bytes=weight_bytes(model) + gen_state)
        train(cfg, model, processor, data, rate=args.rate, callbacks=[monitor], cache=cache)
        del cache
    measured = monitor.peak_bytes()
    ratio = est["total"] / measured
    return {
        "batch_size": args.batch_size,
        "micro_batch": micro,
        "rate": args.rate,
        "dtype": cfg.dtype,
        "estimated_peak_gib": _gib(est["total"]),
        "measured_peak_gib": _gib(measured),
        "ratio": round(ratio, 4),
        "within_band": BAND[0] <= ratio <= BAND[1],
        "step_s": round(monitor.median_step_s(), 4),
        "steps_s": [round(s, 4) for s in monitor.step_seconds()],
        "first_step_s": round(monitor.times[1] - monitor.times[0], 3),
        "train_wall_s": round(time.perf_counter() - t0, 2),
        "store_build_s": round(store_s, 2),
        "losses": [round(m["loss"], 6) for m in monitor.metrics],
        "estimate_gib": {
            k: _gib(est[k])
            for k in ("weights", "activations", "logits", "generator", "transient", "total")
        },
        "shapes": {**shapes, "visual_tokens": list(shapes["visual_tokens"])},
        "generator_params": gen_params,
        "peak_measured_how": monitor.method,
    }


# ---------------------------------------------------------------------------------------------
# TTFT


def ttft(args, arch: str, model, processor, device, dtype) -> dict[str, Any]:
    """Turn-1 prefill through `Conversation`: all tokens against each method at the TTFT rate."""
    from bench import lvlm
    from mc_core.compressors import build
    from mc_core.data.images import as_rgb
    from mc_core.data.schema import row
    from mc_core.inference.conversation import Conversation
    from mc_core.runtime import token_dim

    r = row(lvlm.dialogues(arch, 1, seed=1), 0)
    image, question = as_rgb([r["image"]]), r["questions"][0]
    cases: dict[str, Any] = {"none": None}
    for name in TTFT_METHODS:
        comp = build(name, rate=args.ttft_rate, dim=token_dim(model))
        cases[name] = comp.to(device=device, dtype=dtype).eval().requires_grad_(False)
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    kept: dict[str, int] = {}
    names = list(cases)
    for rnd in range(args.warmup + args.repeats):
        # Rotating order: drift (clocks, other load) hits every case alike.
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            conv = Conversation(model, processor, cases[name], images=image, max_new_tokens=1)
            conv.ask(question)
            kept[name] = int(sum(conv.visual_tokens))
            if rnd >= args.warmup:
                seconds[name].append(conv.prefill_s[0])
    full = statistics.median(seconds["none"])
    out = {
        "rate": args.ttft_rate,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "how": "Conversation.prefill_s[0]: processor, vision tower, compression and LLM "
        "prefill to the first token (CUDA-synchronised); median over rounds",
        "methods": {},
    }
    for name, s in seconds.items():
        ms = statistics.median(s) * 1e3
        out["methods"][name] = {
            "visual_tokens": kept[name],
            "ttft_ms": round(ms, 3),
            "ttft_ms_all": [round(x * 1e3, 3) for x in s],
            "speedup_vs_full": round(full * 1e3 / ms, 4),
        }
    return out


# ---------------------------------------------------------------------------------------------
# The run


def run_arch(args, arch: str, device) -> dict[str, Any]:
    """Build `arch`, measure its training step and TTFT, free it."""
    from bench import lvlm

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    model, processor = lvlm.build(arch, "tiny" if args.tiny else "real", device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    try:
        training = train_step(args, arch, model, processor, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        latency = ttft(args, arch, model, processor, device, dtype)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "arch": arch,
        "scale": "tiny" if args.tiny else "real",
        "params": params,
        "model_build_s": round(build_s, 2),
        "training": training,
        "ttft": latency,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of `python -m bench.gpu_acceptance`; returns the result (also written)."""
    from mc_core import io

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = _device(args.tiny)
    machine = args.machine or machine_slug(device)
    path = args.out / f"gpu-{machine}-{datetime.now(UTC).date().isoformat()}.json"
    result: dict[str, Any] = {
        "schema": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.gpu_acceptance " + shlex.join(argv),
        "machine": describe_machine(device),
        "attn_implementation": "sdpa",
        "band": list(BAND),
        "complete": False,
        "archs": [],
    }
    t0 = time.perf_counter()
    for arch in args.arch:
        res = run_arch(args, arch, device)
        result["archs"].append(res)
        tr, lat = res["training"], res["ttft"]["methods"]
        print(
            f"{arch}: batch {tr['batch_size']} (micro {tr['micro_batch']}) peak "
            f"{tr['measured_peak_gib']} GiB measured, {tr['estimated_peak_gib']} GiB estimated "
            f"(ratio {tr['ratio']}), step {tr['step_s']} s; TTFT full "
            f"{lat['none']['ttft_ms']:.1f} ms, "
            + ", ".join(
                f"{m} {lat[m]['ttft_ms']:.1f} ms ({lat[m]['speedup_vs_full']:.2f}x)"
                for m in TTFT_METHODS
            ),
            flush=True,
        )
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        io.write_json(path, result, indent=2)  # a timeout keeps what finished
    result["complete"] = True
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    io.write_json(path, result, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
