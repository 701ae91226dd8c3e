"""Training at real widths on a CPU: the memory estimate against the measured peak, per case.

Usage::

    python -m bench.scale                       # LLaVA-1.5-7B widths, 2 decoder layers, 4 cases
    python -m bench.scale --tiny --out /tmp/x   # tiny widths: a smoke test in seconds

The model is LLaVA-1.5-7B at its real widths (CLIP ViT-L/14-336 with its 24 layers, the
projector, an LLM of hidden 4096, MLP 11008, 32 heads, vocabulary 32,064) with only
``--layers`` (2) decoder layers, random weights, float32 (`bench.lvlm`: the family's offline
processor, so the real training loop runs on it). A few optimiser steps of
`mc_core.training.loop.train` (batch 2, micro-batch 2) on generated 3-turn dialogues with
336 x 336 images train the metacompress generator at rate 0.5, in four cases:
activation checkpointing off / on, times visual tokens "store" / "recompute".

Each case runs in a fresh Python process (``--child``), so that every peak is its own and no
case inherits another's heap. Per case:

- ``estimated_peak_gib``: `mc_core.training.memory.estimate` for the step's shapes: the
  micro-batch, ``seq_len`` = the longest compressed dialogue (its full length - n + m),
  the most answer tokens of a dialogue, one image per dialogue, ``(n, m)``, the generator's
  parameter count, float32, SDPA, checkpointing and the visual-token mode as the case's (the
  shapes are the store's ``step_shapes``, what the loop's ``micro_batch: auto`` plans with);
- ``measured_peak_gib``: the peak of the steps after the first (`bench.step_memory`, whose
  docstring says how: weights and generator state counted from their tensors, plus the growth of
  the resident set over the steps, its peak reset through ``/proc/self/clear_refs`` at their
  start; heap allocations above 64 KiB mapped on their own so freed tensors leave the resident
  set). The target store is built before training, outside the measurement; the first step is
  left out too (it also holds the run's set-up and first-touch allocations). ``ratio`` =
  estimated / measured; ``ratio_beyond_weights`` the same without the weights, which both
  count exactly: at 2 layers they are most of the total, this ratio tests the rest;
- ``step_s``: the median duration of the steps after the first;
- ``store_bytes_per_dialogue``: the target store's size on disk / dialogues (``recompute``
  stores leave the projector output out).

The machine's other load moves step times (they are indicative on a shared CPU), not the
memory. The result goes to ``bench/results/scale-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.machine import _proc_status, describe_machine, machine_slug
from bench.step_memory import (
    GIB,
    MALLOC_ENV,
    StepMonitor,
    bytes_of,
    weight_bytes,
)

# (activation_checkpointing, visual_tokens) per case name.
CASES: dict[str, tuple[bool, str]] = {
    "plain-store": (False, "store"),
    "checkpointed-store": (True, "store"),
    "plain-recompute": (False, "recompute"),
    "checkpointed-recompute": (True, "recompute"),
}
BAND = (0.8, 1.25)  # issue 26: the estimate within this factor of the measurement
_RESULT = "SCALE-RESULT "  # prefix of the child's one JSON line on stdout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (its help documents every knob)."""
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llava-1.5-7b", choices=["llava-1.5-7b", "qwen2-vl-7b"])
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny widths (bench.shapes' 'tiny' scale: LLM hidden 64, vocab 512, a 2-layer "
        "tower of width 32; the real image geometry) for a smoke test",
    )
    p.add_argument("--layers", type=int, default=2, help="LLM decoder layers (real: 32)")
    p.add_argument("--hidden", type=int, default=None, help="LLM hidden size override")
    p.add_argument("--intermediate", type=int, default=None, help="LLM MLP width override")
    p.add_argument("--heads", type=int, default=None, help="LLM attention heads override")
    p.add_argument("--vision-layers", type=int, default=None, help="vision tower layers override")
    p.add_argument("--dialogues", type=int, default=8, help="generated training dialogues")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument(
        "--steps", type=int, default=4, help="optimiser steps (the first is not measured)"
    )
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--method", default="metacompress")
    p.add_argument(
        "--cases",
        nargs="+",
        default=list(CASES),
        choices=list(CASES),
        help="which (checkpointing, visual tokens) cases to run, each in its own process",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: more oversubscribe a shared 2-core machine)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--machine", default=None, help="label in the file name (default: cpu-<n>c)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--child", choices=list(CASES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("layers", "dialogues", "batch_size", "micro_batch", "steps", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.steps < 2:
        raise SystemExit(f"--steps={args.steps}: expected >= 2 (the first step is not measured)")
    if args.micro_batch > args.batch_size:
        raise SystemExit(
            f"--micro-batch={args.micro_batch} > --batch-size={args.batch_size}: a micro-batch "
            "is a part of one step's batch"
        )
    if args.dialogues < args.batch_size:
        raise SystemExit(
            f"--dialogues={args.dialogues} < --batch-size={args.batch_size}: not one full batch"
        )
    if not 0 < args.rate < 1:
        raise SystemExit(f"--rate={args.rate}: expected a reduction rate in (0, 1)")
    return args


def overrides(args: argparse.Namespace) -> tuple[str, dict[str, int], dict[str, int]]:
    """(scale, LLM config overrides, vision tower overrides) of the command line."""
    text: dict[str, int] = {"num_hidden_layers": args.layers}
    for flag, key in (
        ("hidden", "hidden_size"),
        ("intermediate", "intermediate_size"),
        ("heads", "num_attention_heads"),
    ):
        if getattr(args, flag) is not None:
            text[key] = getattr(args, flag)
    if args.heads is not None:
        text["num_key_value_heads"] = args.heads
    vision = {}
    if args.vision_layers is not None:
        key = "depth" if args.arch.startswith("qwen") else "num_hidden_layers"
        vision[key] = args.vision_layers
    return ("tiny" if args.tiny else "real"), text, vision


def _rss() -> float:
    return (_proc_status("VmRSS") or float("nan")) * 2**20


def _gib(x: float) -> float | None:
    return round(x / GIB, 4) if math.isfinite(x) else None  # strict JSON has no NaN


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# One case, in its own process


def run_case(args: argparse.Namespace, case: str) -> dict[str, Any]:
    """Train `args.steps` steps of one case in this process; its measurements."""
    from bench import lvlm
    from mc_core.compressors import build
    from mc_core.runtime import token_dim
    from mc_core.training.loop import train

    checkpointing, visual = CASES[case]
    torch.set_num_threads(args.threads)
    t_case = time.perf_counter()
    data = lvlm.dialogues(args.arch, args.dialogues, seed=0)
    rss_runtime = _rss()  # the runtime and the dataset: resident, not part of a step
    scale, text, vision = overrides(args)
    t0 = time.perf_counter()
    model, processor = lvlm.build(args.arch, scale, text=text, vision=vision)
    build_s = time.perf_counter() - t0
    cfg = _case_config(args, checkpointing, visual)
    # The compressor train() will build (same seed, same kwargs): its size and kept count.
    comp = build(cfg.method, rate=args.rate, dim=token_dim(model), **cfg.build_kwargs())
    gen_params = sum(p.numel() for p in comp.parameters())
    needs = comp.needs
    # parameters + gradients (+ SGD momentum when on), float32 as the loop keeps them
    gen_state = bytes_of(comp.parameters()) * (2 + (cfg.momentum > 0))
    weights = weight_bytes(model)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        store_dir = Path(tmp) / "store"
        t0 = time.perf_counter()
        cache = _store(cfg, model, processor, data, store_dir, needs)
        store_s = time.perf_counter() - t0
        store = _dir_bytes(store_dir)
        # The shapes the loop plans "auto" with: the costliest step of the store's dialogues.
        shapes = cache.step_shapes(comp.kept)
        est = _estimate(model, cfg, shapes, gen_params)
        del comp
        monitor = StepMonitor(torch.device("cpu"), resident_bytes=weights + gen_state)
        train(cfg, model, processor, data, rate=args.rate, callbacks=[monitor], cache=cache)
        del cache
    measured = monitor.peak_bytes()
    steps_s = monitor.step_seconds()
    return {
        "case": case,
        "activation_checkpointing": checkpointing,
        "visual_tokens": visual,
        "estimated_peak_gib": _gib(est["total"]),
        "measured_peak_gib": _gib(measured),
        "ratio": round(est["total"] / measured, 4),
        # The same without the weights, which both sides count exactly: the part of the peak
        # the activation model has to get right (at 2 layers the weights are most of the total).
        "estimated_beyond_weights_gib": _gib(est["total"] - est["weights"]),
        "measured_beyond_weights_gib": _gib(measured - weights),
        "ratio_beyond_weights": round((est["total"] - est["weights"]) / (measured - weights), 4),
        "step_s": round(monitor.median_step_s(), 3),
        "store_bytes_per_dialogue": round(store / len(data), 1),
        "store_bytes": store,
        "store_build_s": round(store_s, 2),
        "estimate_gib": {
            k: _gib(est[k])
            for k in ("weights", "activations", "logits", "generator", "transient", "total")
        },
        "estimate_inputs": est["inputs"],
        "measured": {
            "weights_gib": _gib(weights),
            "generator_state_gib": _gib(gen_state),
            "rss_runtime_gib": _gib(rss_runtime),
            "rss_at_reset_gib": _gib(monitor.rss_at_reset),
            "growth_over_steps_gib": _gib(measured - weights - gen_state),
            "steps_measured": len(steps_s),
        },
        "shapes": {**shapes, "visual_tokens": list(shapes["visual_tokens"])},
        "generator_params": gen_params,
        "steps_s": [round(s, 3) for s in steps_s],
        "first_step_s": round(monitor.times[1] - monitor.times[0], 3),
        "losses": [round(m["loss"], 6) for m in monitor.metrics],
        "model_build_s": round(build_s, 2),
        "wall_s": round(time.perf_counter() - t_case, 2),
        "peak_measured_how": monitor.method,
    }


def _case_config(args: argparse.Namespace, checkpointing: bool, visual: str):
    """The recipe of one case: ``args.steps`` steps of ``args.batch_size`` on the CPU."""
    from mc_core.training.loop import TrainConfig

    return TrainConfig(
        method=args.method,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        activation_checkpointing=checkpointing,
        visual_tokens=visual,
        epochs=math.ceil(args.steps * args.batch_size / args.dialogues),
        max_steps=args.steps,
        device="cpu",
        dtype="float32",
        progress=False,
        log_every=1,
        checkpoint_every=10**9,
    )


def _store(cfg, model, processor, data, store_dir: Path, needs):
    """The case's target store in ``store_dir``, as the train stage builds it."""
    from mc_core.training.targets import build_target_store

    return build_target_store(
        model,
        processor,
        data,
        store_dir,
        needs=needs,
        batch_size=cfg.target_batch,
        device="cpu",
        progress=False,
        topk=cfg.target_topk,
        dtype=cfg.dtype,
        visual_tokens=cfg.visual_tokens,
        shard_dialogues=cfg.shard_dialogues,
    )


def _estimate(model, cfg, shapes: dict[str, Any], gen_params: int) -> dict[str, Any]:
    """`memory.estimate` of one forward's worth (the micro-batch) of this case."""
    from mc_core.training import memory

    return memory.estimate(
        model,
        batch_size=cfg.micro_batch,
        seq_len=shapes["seq_len"],
        answer_tokens=shapes["answer_tokens"],
        dtype="float32",
        attn="sdpa",
        generator_params=gen_params,
        images=cfg.micro_batch * shapes["images"],
        visual_tokens=tuple(shapes["visual_tokens"]),
        target_topk=cfg.target_topk,
        activation_checkpointing=cfg.activation_checkpointing,
        vision=cfg.visual_tokens,
    )


# ---------------------------------------------------------------------------------------------
# The run: one process per case


def _child_argv(argv: list[str], case: str) -> list[str]:
    """This command line minus --cases / --child, plus --child `case`."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a in ("--cases", "--child")
        if not skip and not a.startswith(("--cases=", "--child=")):
            out.append(a)
    return [sys.executable, "-m", "bench.scale", *out, "--child", case]


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every case in a fresh subprocess; the result dict (also written by `main`)."""
    dev = torch.device("cpu")
    torch.set_num_threads(args.threads)
    machine = describe_machine(dev)
    env = {**os.environ, **MALLOC_ENV}
    cases = []
    for case in args.cases:
        t0 = time.perf_counter()
        proc = subprocess.run(
            _child_argv(argv, case),
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"case {case!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        cases.append(json.loads(lines[-1][len(_RESULT) :]))
        print(f"  {case}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    scale, text, vision = overrides(args)
    from bench import shapes

    arch = shapes.get_arch(args.arch, where="--arch")
    return {
        "schema": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.scale " + shlex.join(argv),
        "arch": args.arch,
        "reference_checkpoint": arch.reference,
        "scale": scale,
        "scale_note": (
            f"{'tiny' if args.tiny else 'real'} widths, LLM decoder layers "
            f"{args.layers} (overrides {text}; tower overrides {vision or 'none'}); "
            "random weights"
        ),
        "llm": {**arch.text_fields(scale), **text},
        "vision": {**arch.vision_fields(scale), **vision},
        "machine": machine,
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "method": args.method,
        "rate": args.rate,
        "dialogues": args.dialogues,
        "batch_size": args.batch_size,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "peak_measured_how": (
            "Each case in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (every allocation "
            "above 64 KiB its own mapping, unmapped when freed, so the resident set follows "
            "the live tensors). The target store is built before train(). After the first "
            "step a train() callback runs gc.collect and malloc_trim(0), reads VmRSS and resets "
            "VmHWM through /proc/self/clear_refs; after the last step it reads VmHWM. "
            "measured = weights + generator state (parameters, gradients, optimiser state: "
            "exact tensor bytes; they are resident at the reset and the estimate counts them) "
            "+ (VmHWM - VmRSS at the reset). So the runtime, the dataset and the store, "
            "resident but not part of a step, are left out, as the estimate leaves them out."
        ),
        "step_time_how": (
            "time.perf_counter between consecutive train() callbacks (log_every=1); median of "
            "the steps after the first. torch threads as in machine.torch_threads; the machine "
            "is shared, so step times are indicative"
        ),
        "store_how": (
            "mc_core.training.targets.build_target_store into a temporary folder before "
            "train() (visual_tokens as the case's); the sum of its files' sizes / dialogues"
        ),
        "band": list(BAND),
        "cases": cases,
        "acceptance": acceptance(cases),
    }


def acceptance(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's checks: every ratio inside `BAND`, checkpointing below plain (measured)."""
    by = {c["case"]: c for c in cases}
    within = {c["case"]: BAND[0] <= c["ratio"] <= BAND[1] for c in cases}
    saves = {}
    for visual in ("store", "recompute"):
        plain, ckpt = by.get(f"plain-{visual}"), by.get(f"checkpointed-{visual}")
        if plain and ckpt:
            saves[visual] = {
                "measured_saving_gib": round(
                    plain["measured_peak_gib"] - ckpt["measured_peak_gib"], 4
                ),
                "estimated_saving_gib": round(
                    plain["estimated_peak_gib"] - ckpt["estimated_peak_gib"], 4
                ),
                "saves": ckpt["measured_peak_gib"] < plain["measured_peak_gib"],
            }
    return {
        "ratio_within_band": within,
        "checkpointing_saves_memory": saves,
        "pass": all(within.values()) and all(s["saves"] for s in saves.values()),
    }


def table(result: dict[str, Any]) -> str:
    """The markdown table of the cases (docs/benchmarks.md)."""
    rows = [
        "| case | estimated peak GiB | measured peak GiB | estimated / measured | step s "
        "| store bytes / dialogue |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        store = c["store_bytes_per_dialogue"]
        rows.append(
            f"| {c['case']} | {c['estimated_peak_gib']:.3f} | {c['measured_peak_gib']:.3f} "
            f"| {c['ratio']:.2f} | {c['step_s']:.2f} "
            f"| {'–' if store is None else f'{store:,.0f}'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point of `python -m bench.scale`; returns the result (None in a child)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child is not None:
        res = run_case(args, args.child)
        print(_RESULT + json.dumps(res), flush=True)
        return None
    from mc_core import io

    res = run(args, argv)
    machine = args.machine or machine_slug(torch.device("cpu"))
    path = args.out / f"scale-{machine}-{datetime.now(UTC).date().isoformat()}.json"
    io.write_json(path, res, indent=2)
    print(table(res))
    print(f"acceptance: {json.dumps(res['acceptance'])}\nwrote {path}")
    return res


if __name__ == "__main__":
    main()
