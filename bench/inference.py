"""Inference benchmark: prefill (TTFT) and three-turn latency, uncompressed vs every compressor.

One run builds one random-weight LVLM at real (GPU) or scaled-down (CPU) shapes and measures,
side by side and round-robin (so load drift on a shared machine hits every case alike):

- the vision tower + projector (``vision_ms``; the same for every method: compressors act on the
  projector output, but the paper's TTFT includes the tower, so ``ttft_ms`` does too);
- the method's context (``context_ms``: [CLS] attention / keys / FastV's prompt attention) and
  its call alone (``compress_ms``);
- the LLM prefill up to the first greedy token (``prefill_ms``, input rewrite included);
- the end-to-end three-turn latency (``e2e_ms``): compress once, prefill turn 1, then text-only
  turns over the reused KV cache, greedy ``new_tokens`` tokens per turn (no EOS stop: the weights
  are random, a fixed count keeps every case the same length);
- the peak memory of each case, in a pass of its own.

The instruments (clock, peak memory, machine description) are in `bench.machine`; the rows,
ratios and targets computed from the timings in `bench.summary`. Device and dtype follow the
project's rules (`mc_core.runtime`): ``auto`` is CUDA when present, bfloat16 on CUDA and
float32 on the CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from bench.machine import Clock, PeakMemory, describe_machine
from bench.shapes import (
    ArchShape,
    PromptShape,
    build_model,
    check_scale,
    get_arch,
    make_inputs,
    turn_ids,
)
from bench.summary import Case, prefill_flops_fn, summarise, targets
from mc_core.inference.compress import token_contexts
from mc_core.runtime import auto_dtype, resolve_device, token_dim

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_RATES",
    "Bench",
    "Case",
    "Clock",
    "PeakMemory",
    "check_methods",
    "check_rates",
    "describe_machine",
    "run",
    "run_once",
]

# Methods run by default: the uncompressed reference, the baselines the issue names, MetaCompress.
DEFAULT_METHODS = ("none", "sample", "pool", "metacompress", "fastv", "tome", "divprune")
DEFAULT_RATES = (0.5, 0.75, 0.9)
FASTV_LAYER = 2  # FastV ranks at LLM layer K = 2, as in the paper (docs/method.md)
NOTES = (
    "Random weights: timings only. metacompress is the untrained generator (its init, "
    "W_q = W_k); training changes its weights, not its cost.",
    "speedup_measured = (context + compress + LLM prefill) of none / of the method "
    "(vision tower excluded: identical for all methods, reported as vision_ms).",
    "speedup_ideal = prefill sequence length (text + visual tokens) ratio; "
    "speedup_ideal_flops = analytic LLM prefill FLOPs ratio.",
    "overhead_vs_sample = post-tower prefill of the method / that of sample - 1 "
    "(overhead_vs_sample_calls: the same from the context + compressor calls alone, "
    "as a fraction of sample's post-tower prefill); "
    "compress_pct_of_prefill = compressor call / LLM prefill of the method x 100.",
)


# --------------------------------------------------------------------------------------------
# One dialogue of one case


@dataclass
class Bench:
    """Everything one round of cases needs: model, adapter, inputs, follow-up turn ids."""

    model: torch.nn.Module
    adapter: object
    inputs: dict
    later_turns: list[torch.Tensor]
    new_tokens: int
    device: torch.device
    fastv_layer: int = FASTV_LAYER


def _reset_state(model, adapter=None) -> None:
    # Qwen2-VL keeps mrope deltas between calls; a new dialogue must start without them.
    if hasattr(adapter, "reset_state"):
        adapter.reset_state()
        return
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


def _greedy(model, out, steps: int) -> tuple[torch.Tensor, object]:
    """Decode `steps` more tokens greedily over `out.past_key_values`; return the last id."""
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)  # (1, 1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    return nxt, cache


def run_once(bench: Bench, case: Case) -> dict[str, float]:
    """One full three-turn dialogue for `case`; returns its interval times in ms."""
    model, adapter, inputs = bench.model, bench.adapter, bench.inputs
    clock = Clock(bench.device)
    _reset_state(model, adapter)
    clock.mark("start")
    tokens = adapter.visual_tokens(inputs)  # list of (n_i, d)
    clock.mark("vision_ms")
    comp = case.compressor
    if comp is None:
        kept, ps = tokens, None
        clock.mark("context_ms")
        clock.mark("compress_ms")
    else:
        ctxs = token_contexts(model, adapter, comp, inputs, tokens, fastv_layer=bench.fastv_layer)
        clock.mark("context_ms")
        kept, ps = comp(tokens, ctxs)  # lists of (m_i, d) and (m_i, n_i)
        clock.mark("compress_ms")
    feed = adapter.inputs_with(inputs, kept, P=ps)  # Qwen: P-weighted M-RoPE positions
    _reset_state(model, adapter)
    out = model(**feed, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)  # first token: TTFT ends here
    clock.mark("prefill_ms")
    nxt, cache = _greedy(model, out, bench.new_tokens - 1)
    clock.mark("turn1_decode_ms")
    for i, text in enumerate(bench.later_turns, start=2):
        chunk = torch.cat([nxt, text], dim=1)  # last answer token + the next question
        out = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt, cache = _greedy(model, out, bench.new_tokens - 1)
        clock.mark(f"turn{i}_ms")
    t = clock.intervals()
    t["ttft_ms"] = t["vision_ms"] + t["context_ms"] + t["compress_ms"] + t["prefill_ms"]
    t["e2e_ms"] = sum(v for k, v in t.items() if k != "ttft_ms")
    if not case.seq_len:
        case.seq_len = int(feed["input_ids"].shape[1])
        case.visual_tokens = int(sum(k.shape[0] for k in kept))
    return t


# --------------------------------------------------------------------------------------------
# The benchmark


def check_rates(rates: Sequence[float]) -> list[float]:
    """Each rate must satisfy 0 < rate < 1 (ValueError naming --rates)."""
    if not rates:
        raise ValueError("--rates is empty")
    for r in rates:
        if not (isinstance(r, int | float) and 0 < r < 1):  # also rejects NaN
            raise ValueError(f"--rates: {r!r} is not in (0, 1)")
    return [float(r) for r in rates]


def check_methods(methods: Sequence[str], available: Sequence[str]) -> list[str]:
    """Known method names, 'none' first (ValueError naming --methods and listing the known)."""
    if not methods:
        raise ValueError("--methods is empty")
    known = set(available) | {"none"}
    for m in methods:
        if m not in known:
            raise ValueError(f"--methods: {m!r} is not one of {sorted(known)}")
    ordered = ["none"] + [m for m in dict.fromkeys(methods) if m != "none"]
    return ordered


def run(
    arch: str = "llava-1.5-7b",
    scale: str = "cpu",
    *,
    device: str = "auto",
    rates: Sequence[float] = DEFAULT_RATES,
    methods: Sequence[str] = DEFAULT_METHODS,
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 4,
    turns: int = 3,
    threads: int | None = None,
    prompt: PromptShape | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark `methods` x `rates` on `arch` at `scale`; returns the results dict.

    Args:
        arch: a name of `bench.shapes.ARCHS`.
        scale: "real" (published shapes; needs a GPU), "cpu" (scaled-down LLM and tower, real
            token counts) or "tiny" (tests).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        rates: reduction rates, each in (0, 1).
        methods: compressor names (`mc_core.compressors.available()`) and "none".
        repeats: timed rounds (each runs every case once, in rotating order).
        warmup: untimed rounds first.
        new_tokens: greedy tokens decoded per turn (>= 1).
        turns: dialogue turns (>= 1); turn 1 carries the image.
        threads: torch CPU threads (default 1 on CPU, see below); fixed for the whole run.
        prompt: text token counts around the image and per later turn (default PromptShape()).
        seed: seed of the weights, pixels and text ids.
        progress: called with one line per finished round (e.g. `print`).

    Raises:
        ValueError: unknown arch / scale / method, a rate outside (0, 1), bad counts, or
            `scale="real"` on a CPU.
    """
    from mc_core.compressors import available

    prompt = prompt or PromptShape()
    shape: ArchShape = get_arch(arch)
    check_scale(scale, where="--scale")
    dev = resolve_device(device, where="--device")
    if scale == "real" and dev.type != "cuda":
        raise ValueError("--scale real needs a CUDA device (7B models); use --scale cpu on CPU")
    rates = check_rates(rates)
    methods = check_methods(methods, available())
    for name, value, low in (
        ("--repeats", repeats, 1),
        ("--warmup", warmup, 0),
        ("--new-tokens", new_tokens, 1),
        ("--turns", turns, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads={threads!r} must be an integer >= 1")
    # One thread by default on CPU: on a shared machine, multi-threaded kernels wait at every
    # barrier for a descheduled thread and timings blow up (measured here: a 114-token prefill
    # 10x slower with 2 threads under load); pass --threads on a quiet machine.
    n_threads = threads or (1 if dev.type == "cpu" else torch.get_num_threads())
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        return _measure(
            shape,
            scale,
            dev,
            rates,
            methods,
            repeats=repeats,
            warmup=warmup,
            new_tokens=new_tokens,
            turns=turns,
            prompt=prompt,
            seed=seed,
            progress=progress,
        )
    finally:  # the thread count is process-wide: leave it as the caller had it
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# The measurement


def _measure(
    shape: ArchShape,
    scale: str,
    dev: torch.device,
    rates: list[float],
    methods: list[str],
    *,
    repeats: int,
    warmup: int,
    new_tokens: int,
    turns: int,
    prompt: PromptShape,
    seed: int,
    progress: Callable[[str], None] | None,
) -> dict:
    """The measurement behind `run`, on validated arguments."""
    # bf16 + sdpa on GPU (what serving uses); fp32 on CPU, where bf16 matmuls are often slower.
    dtype = auto_dtype(dev)
    machine = describe_machine(dev)
    t0 = time.perf_counter()
    model = build_model(shape, scale, device=dev, dtype=dtype, seed=seed)
    build_s = time.perf_counter() - t0
    bench = _bench(model, shape, prompt, dev, new_tokens=new_tokens, turns=turns, seed=seed)
    cases = _cases(methods, rates, token_dim(model), dev, dtype)

    def report(line: str) -> None:
        if progress:
            progress(f"{line} ({time.perf_counter() - t0:.0f} s)")

    memory_method = _time_cases(bench, cases, repeats=repeats, warmup=warmup, progress=report)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "schema": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": None,  # set by the CLI (bench.__main__), which knows its argv
        "arch": shape.name,
        "scale": scale,
        "scale_note": _scale_note(shape, scale),
        "reference_checkpoint": shape.reference,
        "machine": machine,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "model_build_s": round(build_s, 2),
        "llm": _llm_dims(model),
        "prompt": vars(prompt) | {"turns": turns, "new_tokens_per_turn": new_tokens},
        "timing": {
            "repeats": repeats,
            "warmup": warmup,
            "clock": "torch.cuda.Event" if dev.type == "cuda" else "time.perf_counter",
            "statistic": "median over rounds; ratios are medians of per-round paired ratios",
        },
        "memory_method": memory_method,
        "fastv_layer": bench.fastv_layer,
        "flops_source": "mc_core.inference.flops.prefill_flops (LLM prefill, causal attention)",
        "notes": list(NOTES),
        "cases": summarise(cases, shape.name, prefill_flops_fn(model)),
    }
    result["targets"] = targets(result["cases"])
    return result


def _bench(
    model, shape: ArchShape, prompt: PromptShape, dev: torch.device, *, new_tokens, turns, seed
) -> Bench:
    """The inputs every case shares: the image prompt, the later turns' ids, the adapter."""
    from mc_core.models.families import adapter_for

    inputs = make_inputs(model, shape, prompt, seed=seed)
    later = [turn_ids(model, prompt.later_turn, seed=seed + i) for i in range(2, turns + 1)]
    # FastV's K = 2, or the last layer of a shallower (test) LLM.
    fastv_layer = min(FASTV_LAYER, model.config.get_text_config().num_hidden_layers - 1)
    return Bench(model, adapter_for(model), inputs, later, new_tokens, dev, fastv_layer)


def _cases(
    methods: list[str], rates: list[float], dim: int, dev: torch.device, dtype: torch.dtype
) -> list[Case]:
    """The uncompressed reference, then every method at every rate (frozen, on `dev`)."""
    from mc_core.compressors import build

    cases = [Case("none", None)]
    for rate in rates:
        for m in methods[1:]:
            comp = build(m, rate=rate, dim=dim)
            comp = comp.to(device=dev, dtype=dtype).eval().requires_grad_(False)
            cases.append(Case(m, rate, comp))
    return cases


def _time_cases(
    bench: Bench, cases: list[Case], *, repeats: int, warmup: int, progress: Callable[[str], None]
) -> str:
    """Warm-up rounds, timed rounds (each case once per round, in rotating order), then each
    case's peak memory in a pass of its own; fills the cases, returns the memory method."""
    method = ""
    with torch.inference_mode():
        for _ in range(warmup):
            for case in cases:
                run_once(bench, case)
        for r in range(repeats):
            k = r % len(cases)  # rotate the order: no case always runs first / after the same one
            for case in cases[k:] + cases[:k]:
                case.times.append(run_once(bench, case))
            progress(f"round {r + 1}/{repeats} done")
        for case in cases:  # memory in its own pass: peaks must not mix across cases
            with PeakMemory(bench.device) as mem:
                run_once(bench, case)
            case.peak_mem_mb, case.peak_mem_delta_mb = mem.peak_mb, mem.delta_mb
            method = mem.method
    return method


def _scale_note(shape: ArchShape, scale: str) -> str:
    if scale == "real":
        return f"real shapes of {shape.reference}"
    if scale == "cpu":
        return (
            f"cpu-scaled: {shape.reference}'s image geometry and visual token counts, "
            f"LLM and vision tower shrunk ({shape.cpu_text}; vision {shape.cpu_vision})"
        )
    return "tiny: test shapes only"


def _llm_dims(model) -> dict:
    tc = model.config.get_text_config()
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    )
    params = sum(p.numel() for p in model.parameters())
    return {k: getattr(tc, k, None) for k in keys} | {"params_total": params}
