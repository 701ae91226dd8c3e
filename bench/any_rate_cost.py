"""Training cost of one any-rate compressor against the per-rate ones, side by side in one run.

Usage::

    python -m bench.any_rate_cost                       # tiny-llava, the params' budgets
    python -m bench.any_rate_cost --arch tiny-qwen2-vl --steps 40 --rounds 3 --out bench/results

The grid's per-rate cells train ``--cell-steps`` (600) steps each at their rate; the any-rate
compressor trains ``--any-steps`` (1,200) steps, each at a rate drawn from ``--rates``. A step's
cost depends on its rate (the student LLM sees ``m`` visual tokens), so the bench times
``--steps`` optimiser steps of each configuration on the same model, data and cached targets,
in ``--rounds`` interleaved rounds (cell 0.5, 0.75, 0.9, any, then again: a drift of the
machine's load hits every configuration alike), and keeps each one's median seconds per step.
The wall time of a whole budget is then steps x seconds per step:

    per-rate: sum over grid rates of cell_steps x s/step(rate)
    any-rate: any_steps x s/step(any)

and ``ratio`` = any-rate / per-rate. The ideal ratio (every step the same price) is
``any_steps / (len(rates) x cell_steps)``, printed beside it. The model is the tiny arch at
random weights (the cost does not depend on them), the targets cached as in the pipeline,
one torch thread by default. Writes ``<out>/any-rate-cost-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from bench.machine import describe_machine, machine_slug
from bench.train_throughput import setup
from mc_core import io
from mc_core.models import zoo
from mc_core.runtime import resolve_device
from mc_core.training.loop import TrainConfig, train
from mc_core.training.targets import build_target_cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (its help documents every knob)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.any_rate_cost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", default="tiny-llava", choices=sorted(zoo.TINY))
    p.add_argument("--grid-rates", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    p.add_argument("--cell-steps", type=int, default=600, help="budget of one per-rate cell")
    p.add_argument("--any-steps", type=int, default=1200, help="budget of the any-rate one")
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration/round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dialogues", type=int, default=72)
    p.add_argument("--batch-size", type=int, default=36)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    return p.parse_args(argv)


def _per_step(cfg: TrainConfig, model, processor, data, cache, rate, steps: int) -> float:
    """Seconds per optimiser step of ``steps`` steps (a fresh generator each time)."""
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    train(
        cfg.model_copy(update={"max_steps": steps}), model, processor, data, rate=rate, cache=cache
    )
    sync()
    return (time.perf_counter() - t0) / steps


def run(args: argparse.Namespace) -> dict:
    """Time every configuration; returns the result (also printed by `main`)."""
    device, data, model, processor = setup(args)
    cache = build_target_cache(model, processor, data, device=device, progress=False)
    base = TrainConfig(
        batch_size=args.batch_size,
        epochs=10**6,
        device=str(device),
        progress=False,
        checkpoint_every=10**9,
    )
    configs = {f"cell {r}": (base, r) for r in args.grid_rates}
    configs["any"] = (base.model_copy(update={"rates": list(args.rates)}), None)
    _per_step(base, model, processor, data, cache, args.grid_rates[0], 2)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, (cfg, rate) in configs.items():
            times[name].append(_per_step(cfg, model, processor, data, cache, rate, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_rate = sum(args.cell_steps * med[f"cell {r}"] for r in args.grid_rates)
    any_rate = args.any_steps * med["any"]
    return {
        "arch": args.arch,
        "machine": describe_machine(device),
        "batch_size": args.batch_size,
        "grid_rates": args.grid_rates,
        "rates": args.rates,
        "budgets": {"cell_steps": args.cell_steps, "any_steps": args.any_steps},
        "timed": {"steps": args.steps, "rounds": args.rounds},
        "s_per_step": {k: {"median": med[k], "rounds": v} for k, v in times.items()},
        "per_rate_s": per_rate,
        "any_rate_s": any_rate,
        "ratio": any_rate / per_rate,
        "ideal_ratio": args.any_steps / (len(args.grid_rates) * args.cell_steps),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m bench.any_rate_cost`."""
    args = parse_args(argv)
    res = run(args)
    print(f"training cost, {res['arch']}, batch {res['batch_size']}, {res['machine']['device']}")
    for k, v in res["s_per_step"].items():
        print(
            f"  {k:9s} {v['median'] * 1000:8.1f} ms/step (rounds: "
            + ", ".join(f"{t * 1000:.1f}" for t in v["rounds"])
            + ")"
        )
    print(
        f"  per-rate cells {len(res['grid_rates'])} x {res['budgets']['cell_steps']} steps: "
        f"{res['per_rate_s']:.0f} s; any-rate {res['budgets']['any_steps']} steps: "
        f"{res['any_rate_s']:.0f} s; ratio {res['ratio']:.2f} (ideal {res['ideal_ratio']:.2f})"
    )
    if args.out is not None:
        day = datetime.date.today().isoformat()
        path = (
            args.out
            / f"any-rate-cost-{args.arch}-{machine_slug(resolve_device(args.device))}-{day}.json"
        )
        io.write_text(path, json.dumps(res, indent=1) + "\n")
        print(f"  wrote {path}")


if __name__ == "__main__":
    main()
