"""`python -m bench`: inference benchmark of visual-token compressors (see docs/benchmarks.md).

Example (the committed CPU results):
    python -m bench --arch llava-1.5-7b --scale cpu --repeats 5
"""

from __future__ import annotations

import argparse
import shlex
import sys

from bench.inference import DEFAULT_METHODS, DEFAULT_RATES, run
from bench.machine import machine_slug
from bench.report import write_all
from bench.shapes import ARCHS, SCALES
from mc_core.runtime import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; its help is the documentation of every knob."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Prefill (TTFT) and 3-turn latency, uncompressed vs each compressor, with "
        "the ideal speedups beside the measured ones. Random weights at real (GPU) or "
        "cpu-scaled shapes.",
    )
    p.add_argument(
        "--arch",
        nargs="+",
        default=["llava-1.5-7b"],
        choices=sorted(ARCHS),
        help="architecture(s) to benchmark, one result file each",
    )
    p.add_argument(
        "--scale",
        default="cpu",
        choices=SCALES,
        help="real: published shapes (GPU); cpu: scaled-down LLM and tower with the "
        "real visual token counts; tiny: tests",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--rates", nargs="+", type=float, default=list(DEFAULT_RATES))
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="compressor names; 'none' (uncompressed) is always included",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians over them)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens per turn")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: robust on a shared machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--machine",
        default=None,
        help="machine label in file names (default: GPU name or cpu-<cores>c)",
    )
    p.add_argument("--out", default="bench/results", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each --arch and write JSON, markdown and PNG under --out."""
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv_used)
    machine = args.machine or machine_slug(resolve_device(args.device, where="--device"))
    for arch in args.arch:
        result = run(
            arch,
            args.scale,
            device=args.device,
            rates=args.rates,
            methods=args.methods,
            repeats=args.repeats,
            warmup=args.warmup,
            new_tokens=args.new_tokens,
            turns=args.turns,
            threads=args.threads,
            seed=args.seed,
            progress=lambda line, a=arch: print(f"[{a}] {line}", file=sys.stderr, flush=True),
        )
        result["command"] = shlex.join(["python", "-m", "bench", *argv_used])
        paths = write_all(result, args.out, machine)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
