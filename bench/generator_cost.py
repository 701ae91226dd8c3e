"""Cost of the MetaCompress generator next to the `sample` baseline, at real LVLM sizes.

Usage::

    python -m bench.generator_cost                       # n = 576 and 2880, d = 4096, rate 0.9
    python -m bench.generator_cost --out reports/bench/generator_cost.json

Times one compressor call (P and Y = P X) per image, after warm-up, as the median of
``--repeats`` runs, side by side in one process: CPU float32 always, CUDA bfloat16 tokens too
when a GPU is present. ``metacompress`` reuses its cached positional table across calls with
the same layout (the steady state: one model, one layout); ``metacompress-cold`` clears it before
every call (every image a new layout). The table also gives the generator's FLOPs and their share
of a 7B LLM's prefill over the same n visual tokens (2 x 6.7e9 FLOPs per token), the cost that
compression saves.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from mc_core import io
from mc_core.compressors import TokenContext, build
from mc_core.compressors.ops import kept_tokens
from mc_core.runtime import auto_dtype, resolve_device

LLM_PARAMS_7B = 6.7e9  # LLaVA-1.5-7B's Vicuna: 2 * params FLOPs per prefilled token


def layout(n: int, device: torch.device) -> TokenContext:
    """LLaVA-1.5's 24 x 24 grid for n = 576; otherwise an anyres-like packed sequence with
    positions but no single grid (LLaVA-NeXT's 2880 tokens)."""
    side = math.isqrt(n)
    if side * side == n:
        return TokenContext(grid=(side, side))
    cols = math.ceil(math.sqrt(n))
    idx = torch.arange(n, device=device)
    pos = torch.stack([(idx // cols) / max(n // cols, 1), (idx % cols) / cols], dim=1)
    return TokenContext(positions=pos.clamp(0, 1))


def generator_flops(n: int, m: int, d: int, d_c: int) -> float:
    """Multiply-adds x 2 of one metacompress call: projections, pooled queries, logits, P X."""
    return 2.0 * (n * d * 2 * d_c + m * n * d_c + m * n * d_c + m * n * d)


def time_call(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` in ms (CUDA synchronised around each call).

    The median is the headline; the minimum is the least disturbed run, worth reading on a
    shared machine where other processes inflate every median (cheap calls most of all).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def run(
    sizes: list[int], dim: int, rate: float, warmup: int, repeats: int, devices: list[str]
) -> list[dict]:
    """Measure every (device, n); returns one row per pair."""
    rows = []
    for dev_name in devices:
        device = resolve_device(dev_name)
        dtype = auto_dtype(device)
        for n in sizes:
            m = kept_tokens(n, rate)
            x = torch.randn(n, dim, device=device).to(dtype)
            ctx = layout(n, device)
            sample = build("sample", rate=rate, dim=dim).to(device)
            meta = build("metacompress", rate=rate, dim=dim).to(device)

            def call_sample(sample=sample, x=x):
                return sample(x)

            def call_meta(meta=meta, x=x, ctx=ctx):
                return meta(x, ctx)

            def call_cold(meta=meta, x=x, ctx=ctx):
                meta._pos_cache = None
                return meta(x, ctx)

            with torch.inference_mode():
                t_sample, min_sample = time_call(call_sample, device, warmup, repeats)
                t_meta, min_meta = time_call(call_meta, device, warmup, repeats)
                t_cold, min_cold = time_call(call_cold, device, warmup, repeats)
            flops = generator_flops(n, m, dim, meta.d_c)
            rows.append(
                {
                    "device": dev_name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "n": n,
                    "m": m,
                    "dim": dim,
                    "rate": rate,
                    "sample_ms": t_sample,
                    "metacompress_ms": t_meta,
                    "metacompress_cold_ms": t_cold,
                    "ratio": t_meta / t_sample,
                    "ratio_cold": t_cold / t_sample,
                    "sample_min_ms": min_sample,
                    "metacompress_min_ms": min_meta,
                    "metacompress_cold_min_ms": min_cold,
                    "ratio_min": min_meta / min_sample,
                    "generator_gflop": flops / 1e9,
                    "share_of_7b_prefill": flops / (2 * LLM_PARAMS_7B * n),
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'device':<6} {'dtype':<8} {'n':>5} {'m':>4} {'sample ms':>10} {'meta ms':>9} "
        f"{'ratio':>7} {'cold ms':>9} {'ratio':>7} {'ratio(min)':>10} {'GFLOP':>6} "
        f"{'% 7B prefill':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['device']:<6} {r['dtype']:<8} {r['n']:>5} {r['m']:>4} {r['sample_ms']:>10.3f} "
            f"{r['metacompress_ms']:>9.2f} {r['ratio']:>6.1f}x {r['metacompress_cold_ms']:>9.2f} "
            f"{r['ratio_cold']:>6.1f}x {r['ratio_min']:>9.1f}x {r['generator_gflop']:>6.2f} "
            f"{100 * r['share_of_7b_prefill']:>11.3f}%"
        )
    return "\n".join(lines)


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (``mc_core.io``)."""
    io.write_json(path, doc, indent=2)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[576, 2880], help="tokens per image")
    parser.add_argument("--dim", type=int, default=4096, help="token width (LLM hidden size)")
    parser.add_argument("--rate", type=float, default=0.9, help="reduction rate")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even if present")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup}, {args.repeats}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    rows = run(args.n, args.dim, args.rate, args.warmup, args.repeats, devices)
    print(
        f"generator cost, rate {args.rate}, d = {args.dim}, median of {args.repeats} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads)"
    )
    print(format_table(rows))
    if args.out is not None:
        write_json(
            args.out,
            {
                "benchmark": "generator_cost",
                "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
                "rows": rows,
            },
        )
    return rows


if __name__ == "__main__":
    main()
