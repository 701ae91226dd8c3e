"""Training throughput with and without the cached teacher outputs, side by side in one run.

Usage::

    python -m bench.train_throughput                      # tiny-llava, 24 dialogues, 2 epochs
    python -m bench.train_throughput --dialogues 48 --out reports/bench/train_throughput.json

Both runs train the same generator (same seed, same batches) on the same synthetic dialogues
with a randomly initialised tiny LVLM of the named architecture (the cost does not depend on
the weights):

- cached: the frozen model's projector output and the teacher's answer-position log-probs are
  computed once (`build_target_cache`, timed and included), then every step runs only the
  generator and the student forward/backward;
- uncached: every step re-encodes its dialogues, re-runs the vision tower and the teacher.

Samples/s = dialogues processed (epochs x dataset) / wall time. The ideal ratio, were the
student step free, is (teacher + student) / student per step, so the measured ratio grows with
the number of epochs (the cache is paid once). On CPU the machine is labelled: timings on a
shared 2-core box vary with the other processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from mc_core import io
from mc_core.data.synthetic import generate
from mc_core.models import zoo
from mc_core.runtime import resolve_device
from mc_core.training.loop import TrainConfig, train
from mc_core.training.targets import build_target_cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (its help documents every knob)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.train_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", default="tiny-llava", choices=sorted(zoo.TINY))
    p.add_argument("--dialogues", type=int, default=24, help="synthetic training dialogues")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.9)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine more threads oversubscribe it)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({os.cpu_count()} cores, {threads} torch threads, {platform.machine()})"


def setup(args: argparse.Namespace):
    """``(device, dialogues, model, processor)`` of a training bench: ``--device`` resolved,
    ``--threads`` torch threads on CPU, ``--dialogues`` synthetic dialogues (seed 0) and the tiny
    ``--arch`` at random weights (a step's cost does not depend on them)."""
    device = resolve_device(args.device, where="--device")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    data = generate(args.dialogues, seed=0)
    model, processor = zoo.build(args.arch)
    return device, data, model, processor


def run(args: argparse.Namespace) -> dict:
    """Run both variants; returns the result dict (also printed by `main`)."""
    device, data, model, processor = setup(args)
    base = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=str(device),
        progress=False,
        checkpoint_every=10**9,
    )
    samples = args.epochs * len(data)
    results = {}
    weights = {}
    for name, cached in (("cached", True), ("uncached", False)):
        cfg = TrainConfig(cache_targets=cached, **base)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache = (
            build_target_cache(model, processor, data, device=device, progress=False)
            if cached
            else None
        )
        t_cache = time.perf_counter() - t0
        comp = train(cfg, model, processor, data, rate=args.rate, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        weights[name] = comp.w_q.detach().float().cpu()
        results[name] = {
            "wall_s": wall,
            "cache_s": t_cache,
            "samples_per_s": samples / wall,
            "step_samples_per_s": samples / max(wall - t_cache, 1e-9),
        }
    return {
        "arch": args.arch,
        "device": _machine(device),
        "dialogues": len(data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "rate": args.rate,
        "runs": results,
        "ratio": results["cached"]["samples_per_s"] / results["uncached"]["samples_per_s"],
        # Same batches, same seed: the two runs train the same generator up to the float
        # differences of batching the teacher forward differently.
        "max_abs_weight_diff": float((weights["cached"] - weights["uncached"]).abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m bench.train_throughput`."""
    res = run(parse_args(argv))
    print(
        f"training throughput, {res['arch']}, {res['dialogues']} dialogues x {res['epochs']} "
        f"epochs, batch {res['batch_size']}, rate {res['rate']} on {res['device']}"
    )
    for name, r in res["runs"].items():
        print(
            f"  {name:9s} {r['samples_per_s']:8.2f} samples/s  (wall {r['wall_s']:.2f} s, "
            f"cache build {r['cache_s']:.2f} s, steps only {r['step_samples_per_s']:.2f} samples/s)"
        )
    print(
        f"  ratio cached / uncached: {res['ratio']:.2f}x "
        f"(max |w_cached - w_uncached| = {res['max_abs_weight_diff']:.2e})"
    )
    out = parse_args(argv).out
    if out is not None:
        io.write_json(out, res, indent=2)


if __name__ == "__main__":
    main()
