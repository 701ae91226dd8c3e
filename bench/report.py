"""Write benchmark results: JSON, a markdown table and a plot, each atomically (temp + rename)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mc_core.io import staged_file

# Fields every case row carries (tests check them; docs/benchmarks.md explains them).
REQUIRED_CASE_FIELDS = (
    "method",
    "rate",
    "arch",
    "speedup_measured",
    "speedup_ideal",
    "speedup_ideal_flops",
    "overhead_vs_sample",
    "prefill_ms",
    "e2e_ms",
    "peak_mem_mb",
)


def _atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then publish it as `path` (``mc_core.io``: no half-written file)."""
    with staged_file(path) as tmp:
        write(tmp)


def _finite(x):
    """Copy of `x` with NaN / inf floats as None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def stem(result: dict, machine: str) -> str:
    """File stem `<machine>-<arch>-<scale>`."""
    return f"{machine}-{result['arch']}-{result['scale']}"


def markdown(result: dict) -> str:
    """A markdown table of every case plus the targets at 90%."""
    m = result["machine"]
    head = [
        f"### {result['arch']} ({result['scale']}) on {m.get('gpu') or m['cpu']}",
        "",
        f"{result['scale_note']}. dtype {result['dtype']}, attention "
        f"{result['attn_implementation']}, torch {m['torch']}, {m['torch_threads']} threads, "
        f"{result['timing']['repeats']} rounds (median), clock {result['timing']['clock']}, "
        f"load average at start {m.get('loadavg_start')}. FLOPs: {result['flops_source']}.",
        f"Command: `{result['command']}`",
        "",
        "| method | rate | visual tokens | vision ms | context ms | compress ms | prefill ms "
        "| TTFT ms | 3-turn ms | speedup measured (min) | ideal (tokens) | ideal (FLOPs) "
        "| TTFT speedup | compress % of prefill | vs sample | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, spec=".1f"):
        return "–" if v is None else format(v, spec)

    lines = []
    for r in result["cases"]:
        vs = r["overhead_vs_sample"]
        lines.append(
            f"| {r['method']} | {r['rate']:g} | {r['visual_tokens']} | {f(r['vision_ms'])} "
            f"| {f(r['context_ms'], '.2f')} | {f(r['compress_ms'], '.2f')} "
            f"| {f(r['prefill_ms'])} | {f(r['ttft_ms'])} | {f(r['e2e_ms'])} "
            f"| {f(r['speedup_measured'], '.2f')} ({f(r.get('speedup_measured_min'), '.2f')}) "
            f"| {f(r['speedup_ideal'], '.2f')} "
            f"| {f(r['speedup_ideal_flops'], '.2f')} | {f(r['speedup_ttft'], '.2f')} "
            f"| {f(r['compress_pct_of_prefill'], '.2f')} "
            f"| {'–' if vs is None else format(100 * vs, '+.1f') + '%'} "
            f"| {f(r['peak_mem_mb'], '.0f')} |"
        )
    tail = ["", f"Targets at {result['targets']['rate']:g} reduction:", ""]
    t = result["targets"]
    for method, v in t.get("measured_over_ideal", {}).items():
        tail.append(
            f"- {method}: measured / ideal = {f(v['value'], '.2f')} "
            f"(target {v['target']}): {'pass' if v['pass'] else 'MISS'}"
        )
    for key, label in (
        ("metacompress_vs_sample", "metacompress post-tower prefill vs sample"),
        ("metacompress_vs_sample_calls", "metacompress vs sample from the calls alone"),
        ("metacompress_overhead_pct", "metacompress call, % of its prefill"),
    ):
        if key in t:
            v = t[key]
            tail.append(
                f"- {label}: {f(v['value'], '.3g')} (target {v['target']}): "
                f"{'pass' if v['pass'] else 'MISS'}"
            )
    if "note" in t:
        tail.append(f"- {t['note']}")
    return "\n".join(head + lines + tail) + "\n"


def plot(result: dict, path: Path) -> None:
    """Measured vs ideal speedup per method, one panel per rate (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["cases"] if r["method"] != "none"]
    rates = sorted({r["rate"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(
        1, max(1, len(rates)), figsize=(4.2 * max(1, len(rates)), 3.8), sharey=True, squeeze=False
    )
    for ax, rate in zip(axes[0], rates, strict=False):
        by = {r["method"]: r for r in rows if r["rate"] == rate}
        xs = range(len(methods))

        def get(k, by=by):
            return [by[m][k] if m in by and by[m][k] is not None else float("nan") for m in methods]

        ax.bar([x - 0.2 for x in xs], get("speedup_measured"), 0.4, label="measured (post-tower)")
        ax.bar([x + 0.2 for x in xs], get("speedup_ttft"), 0.4, label="measured TTFT", alpha=0.6)
        ax.plot(xs, get("speedup_ideal"), "k_", markersize=18, mew=2, label="ideal (tokens)")
        ax.plot(xs, get("speedup_ideal_flops"), "r_", markersize=18, mew=2, label="ideal (FLOPs)")
        ax.set_xticks(list(xs), methods, rotation=40, ha="right")
        ax.set_title(f"rate {rate:g}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("prefill speedup vs none (x)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['arch']} ({result['scale']} scale) on {result['machine']['device']}")
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_all(result: dict, out_dir: str | Path, machine: str) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md`, `<stem>.png` under `out_dir`; return their paths."""
    missing = [k for k in REQUIRED_CASE_FIELDS for r in result["cases"] if k not in r]
    if missing:
        raise ValueError(f"result cases lack fields {sorted(set(missing))}")
    result = _finite(result)
    out = Path(out_dir)
    s = stem(result, machine)
    paths = {"json": out / f"{s}.json", "md": out / f"{s}.md", "png": out / f"{s}.png"}
    text = json.dumps(result, indent=1, allow_nan=False)
    _atomic_write(paths["json"], lambda p: p.write_text(text + "\n"))
    md = markdown(result)
    _atomic_write(paths["md"], lambda p: p.write_text(md))
    plot(result, paths["png"])
    return paths


def _pct(v):
    return None if v is None else 100 * v


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def summary(results: list[dict], rate: float = 0.9) -> str:
    """One markdown table over result files: each method at `rate` against its `none`."""
    lines = [
        "| machine | arch (scale) | method | TTFT ms (none → method) | prefill speedup measured "
        "(min) | ideal tokens / FLOPs | measured / ideal | vs sample (calls only) "
        "| generator % of prefill |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        m = res["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} thr)"
        base = res["cases"][0]
        for r in res["cases"]:
            if r["rate"] is None or not math.isclose(r["rate"], rate):
                continue
            vs = r["overhead_vs_sample"]
            lines.append(
                f"| {where} | {res['arch']} ({res['scale']}) | {r['method']} "
                f"| {base['ttft_ms']:.0f} → {r['ttft_ms']:.0f} | {r['speedup_measured']:.2f}x "
                f"({_fmt(r.get('speedup_measured_min'), '.2f')}x) "
                f"| {r['speedup_ideal']:.2f}x / {r['speedup_ideal_flops']:.2f}x "
                f"| {r['speedup_measured'] / r['speedup_ideal']:.2f} "
                f"| {'–' if vs is None else format(100 * vs, '+.1f') + '%'} "
                f"({_fmt(_pct(r.get('overhead_vs_sample_calls')), '+.1f')}%) "
                f"| {r['compress_pct_of_prefill']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m bench.report bench/results/*.json  -> summary table
    import sys

    print(summary([json.loads(Path(p).read_text()) for p in sys.argv[1:]]))
