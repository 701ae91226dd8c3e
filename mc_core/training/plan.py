"""Cost plan of a grid of compressor cells (arch x rate) before any GPU is rented.

Per cell: the micro-batch ``mc_core.training.fit`` picks for the GPU's memory and its estimated
peak; per arch: the disk of the target store and the cost of building it; per cell and in all:
FLOPs and GPU-hours. Every number comes from a stated model, printed with the plan:

- Memory: ``mc_core.training.memory.estimate`` at the micro-batch, against the GPU's memory
  less the margin of ``fit.usable_bytes`` (``train.max_memory_gib`` when set).
- Disk: the token store keeps each image's projector output X (n x d in the model dtype) unless
  ``train.visual_tokens: recompute``; the targets keep per answer token the top-k log-probs
  (float16) and ids (int32), the tail (float32) and the position (int64), per token the input ids
  and mask (int64), per visual token its position (2 x float32).
- FLOPs (one multiply-add = 2): the compressed forward through the frozen LLM
  (``mc_core.inference.flops.prefill_flops``, the LM head at the answer positions only), the
  backward at ``backward_factor`` times the forward (an ASSUMPTION, default 2: the full-training
  convention, an upper bound here, where the frozen weights need no weight gradients and the
  GEMMs' backward is about one forward), one more forward of the decoder layers with activation
  checkpointing, the vision tower per image with ``visual_tokens: recompute``
  (``tower_flops``), and P X (m x n x d per image, forward and backward). Sequences count at the
  longest dialogue's length (padding included). The target store's build: one forward over all
  tokens and the vision tower, once per dialogue (twice the forward with ``targets: teacher``:
  the greedy answers first, counted as one more forward).
- Time: FLOPs / (peak dense bf16 throughput x utilisation); ``GPUS`` holds the peaks, and the
  model-FLOP utilisation is an ASSUMPTION (default 0.35), printed and overridable. With N GPUs
  each step's batch is split into N data-parallel parts of ceil(batch / N) dialogues: the wall
  time is the slowest rank's, GPU-hours are wall time x N. The store is built by one rank while
  the others wait (``tasks/train.py``), so its GPU-hours are its wall time x N.
- An any-rate compressor (``plan_any``): its memory is its costliest step's (the lowest rate),
  its FLOPs and time the mean over the rates its steps draw (each step draws one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mc_core.inference.flops import prefill_flops
from mc_core.training import fit, memory
from mc_core.training.config import TrainConfig
from mc_core.training.plan_inputs import ArchInput

__all__ = [
    "GPUS",
    "Gpu",
    "Setup",
    "format_plan",
    "get_gpu",
    "plan_any",
    "plan_arch",
    "plan_cell",
    "plan_grid",
    "tower_flops",
]

_GIB = 1024**3
_MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    """A GPU model: its name, peak dense bf16 tensor throughput (TFLOP/s, no sparsity) and the
    memory CUDA reports (bytes)."""

    name: str
    tflops: float
    memory: int


# Datasheet peaks (dense bf16, FP32 accumulate); memory as nvidia-smi reports it.
GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM 80GB", 989.4, 81559 * _MIB),
    "h200": Gpu("H200 SXM 141GB", 989.4, 143771 * _MIB),
    "a100": Gpu("A100 SXM 80GB", 312.0, 81920 * _MIB),
    "a6000": Gpu("RTX A6000 48GB", 154.8, 49140 * _MIB),
    "l40s": Gpu("L40S 48GB", 362.05, 46068 * _MIB),
    "rtx4090": Gpu("RTX 4090 24GB", 165.2, 24564 * _MIB),
}


def get_gpu(name: str, *, where: str = "gpu") -> Gpu:
    """A ``GPUS`` entry by name (case and '-' / ' ' ignored); ValueError naming the known ones."""
    key = str(name).lower().replace("-", "").replace(" ", "").replace("nvidia", "")
    key = {"h100sxm": "h100", "4090": "rtx4090", "rtxa6000": "a6000"}.get(key, key)
    if key not in GPUS:
        raise ValueError(f"{where}={name!r}: unknown GPU; known: {', '.join(GPUS)}")
    return GPUS[key]


@dataclass(frozen=True)
class Setup:
    """Where and how fast: the GPU, how many (data-parallel), the assumed model-FLOP
    utilisation and backward / forward FLOP ratio (module docstring)."""

    gpu: Gpu
    gpus: int = 1
    utilization: float = 0.35
    backward_factor: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"gpus={self.gpus!r}: expected an int >= 1")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization={self.utilization!r}: expected a fraction in (0, 1]")
        if not 0 <= self.backward_factor <= 10:
            raise ValueError(f"backward_factor={self.backward_factor!r}: expected 0 to 10")

    def seconds(self, flops: float) -> float:
        return flops / (self.gpu.tflops * 1e12 * self.utilization)


def tower_flops(config: Any, n: int) -> float:
    """FLOPs of the vision tower for one image of ``n`` visual tokens: per layer the
    projections and MLP (``2 T (4 h^2 + 2 h I)``) and full attention within a tile (``4 T t h``,
    t the tile's patches: all of Qwen's image, one crop of CLIP / InternViT); the projector is
    left out (a few % of the tower)."""
    v = memory.vision_shape(config)
    if v is None:
        return 0.0
    tokens = memory.tower_tokens(config, n)
    vc = config.vision_config
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", 14)
    size = size[0] if isinstance(size, list | tuple) else size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    tile = min(tokens, (size // patch) ** 2) if size else tokens
    h, i = v["hidden"], v["intermediate"]
    return float(v["layers"] * (2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens * tile * h))


def _dtype(cfg: TrainConfig) -> str:
    return "bfloat16" if cfg.dtype == "auto" else cfg.dtype  # a GPU plan: auto = bf16


def _generator_params(cfg: TrainConfig, rate: float, dim: int) -> tuple[int, Any]:
    from mc_core.compressors import build

    comp = build(cfg.method, rate=rate, dim=dim, **cfg.build_kwargs())
    return sum(p.numel() for p in comp.parameters()), comp


def plan_arch(inp: ArchInput, cfg: TrainConfig, *, dialogues: int, setup: Setup) -> dict:
    """Disk of the arch's target store and the cost of building it (shared by its rates)."""
    d = int(inp.config.get_text_config().hidden_size)
    b = torch.finfo(getattr(torch, _dtype(cfg))).bits // 8
    n, images, answers = inp.visual_tokens, inp.images_per_dialogue, inp.answer_tokens
    full = inp.text_tokens + images * n
    tokens = 0 if cfg.visual_tokens == "recompute" else dialogues * images * n * d * b
    vocab = int(inp.config.get_text_config().vocab_size)
    k = min(cfg.target_topk or vocab, vocab)
    per_answer = (k * (2 + 4) + 4 + 8) if cfg.target_topk else (k * 4 + 8)
    targets = dialogues * (answers * per_answer + full * 16 + images * n * 8)
    forwards = 2 if cfg.targets == "teacher" else 1
    flops = dialogues * (
        forwards * prefill_flops(inp.config, full, logits_positions=answers)
        + images * tower_flops(inp.config, n)
    )
    wall = setup.seconds(flops) / 3600
    return {
        "arch": inp.arch,
        "visual_tokens": n,
        "text_tokens": inp.text_tokens,
        "answer_tokens": answers,
        "images_per_dialogue": images,
        "shapes": inp.source,
        "token_store_bytes": int(tokens),
        "targets_bytes": int(targets),
        "build_flops": flops,
        "build_wall_h": wall,
        "build_gpu_h": wall * setup.gpus,
    }


def _micro(cfg: TrainConfig, per_rank: int, budget: int, shape_kw: dict):
    """``(micro-batch, its estimate, fits, note)`` of what the run would do: ``auto`` fits, an
    int is taken as it is, null is the whole per-rank batch (the fitted one shown if that does
    not fit). A micro-batch of 1 that does not fit: ``(0, None, False, why)``."""
    if isinstance(cfg.micro_batch, int):
        k = min(cfg.micro_batch, per_rank)
        est = fit.fit_micro_batch(batch_size=k, budget_bytes=None, **shape_kw)[1]
        ok = est["total"] <= budget
        return k, est, ok, "" if ok else f"train.micro_batch={k} does not fit"
    try:
        k, est = fit.fit_micro_batch(batch_size=per_rank, budget_bytes=budget, **shape_kw)
    except ValueError as err:
        return 0, None, False, str(err).split("; try ")[0].removeprefix("fit_micro_batch: ")
    if cfg.micro_batch is None and k < per_rank:
        return k, est, False, f"micro_batch null ({per_rank}) does not fit: set auto"
    return k, est, True, ""


def plan_cell(
    inp: ArchInput, rate: float, cfg: TrainConfig, *, dialogues: int, setup: Setup, model=None
) -> dict:
    """Micro-batch, peak memory, FLOPs and hours of training one cell (``model``: the arch's
    meta model, built here when None)."""
    d = int(inp.config.get_text_config().hidden_size)
    params, comp = _generator_params(cfg, rate, d)
    n, images, answers = inp.visual_tokens, inp.images_per_dialogue, inp.answer_tokens
    m = comp.kept(n)
    seq = inp.text_tokens + images * m
    per_rank = math.ceil(cfg.batch_size / setup.gpus)
    budget = int(cfg.max_memory_gib * _GIB) if cfg.max_memory_gib else None
    budget = budget or fit.usable_bytes(setup.gpu.memory)
    shape_kw = dict(
        model_or_config=model if model is not None else memory.meta_model(inp.config),
        seq_len=seq,
        answer_tokens=answers,
        images_per_dialogue=images,
        visual_tokens=(n, m),
        dtype=_dtype(cfg),
        generator_params=params,
        target_topk=cfg.target_topk,
        activation_checkpointing=cfg.activation_checkpointing,
        vision=cfg.visual_tokens,
    )
    micro, est, fits, note = _micro(cfg, per_rank, budget, shape_kw)
    fwd = prefill_flops(inp.config, seq, logits_positions=answers)
    per_dialogue = (1 + setup.backward_factor) * fwd + images * 6.0 * m * n * d
    if cfg.activation_checkpointing:
        per_dialogue += prefill_flops(inp.config, seq, logits_positions=0)
    if cfg.visual_tokens == "recompute":
        per_dialogue += images * tower_flops(inp.config, n)
    steps = cfg.epochs * math.ceil(dialogues / cfg.batch_size)
    wall = steps * setup.seconds(per_rank * per_dialogue) / 3600
    return {
        "arch": inp.arch,
        "rate": rate,
        "kept": m,
        "seq_len": seq,
        "per_rank_batch": per_rank,
        "micro_batch": micro,
        "accumulation": math.ceil(per_rank / micro) if micro else None,
        "peak_bytes": est["total"] if est else None,
        "budget_bytes": budget,
        "fits": fits,
        "note": note,
        "flops_per_step": cfg.batch_size * per_dialogue,
        "steps": steps,
        "train_flops": steps * cfg.batch_size * per_dialogue,
        "wall_h": wall,
        "gpu_h": wall * setup.gpus,
    }


def plan_any(inp: ArchInput, cfg: TrainConfig, *, dialogues: int, setup: Setup, model=None) -> dict:
    """An any-rate compressor (``cfg.rates``), as :func:`plan_cell` plans a cell: the
    micro-batch and peak memory of its costliest step (the lowest rate keeps the most tokens,
    what ``micro_batch: auto`` plans for), and FLOPs and hours averaged over the rates its steps
    draw: a set's members equally, a range at nine evenly spaced rates (a stand-in for the
    uniform draw). ``rate`` is ``"any"`` and ``rates`` the trained ones."""
    if cfg.rates is None:
        raise ValueError("plan_any needs a recipe with train.rates (an any-rate compressor)")
    rates = [float(r) for r in cfg.rates]
    lo, hi = min(rates), max(rates)
    draws = rates if len(rates) > 2 else [lo + (hi - lo) * k / 8 for k in range(9)]
    kw = dict(dialogues=dialogues, setup=setup, model=model)
    costliest = plan_cell(inp, lo, cfg, **kw)
    each = [costliest if r == lo else plan_cell(inp, r, cfg, **kw) for r in draws]
    mean = {k: sum(c[k] for c in each) / len(each) for k in ("flops_per_step", "wall_h", "gpu_h")}
    return {
        **costliest,
        **mean,
        "rate": "any",
        "rates": rates,
        "train_flops": costliest["steps"] * mean["flops_per_step"],
    }


def plan_grid(
    inputs: list[ArchInput],
    rates: list[float],
    cfg_for,
    *,
    dialogues: int,
    setup: Setup,
    models: dict[str, Any] | None = None,
    any_for=None,
    any_archs: Sequence[str] = (),
) -> dict:
    """Every arch and cell of a grid; ``cfg_for(arch, rate)`` is the cell's ``TrainConfig``
    (the arch's store is planned with its first rate's recipe). ``models``: meta models by
    arch, reused and filled (a 7B one takes seconds to build). ``any_for(arch)``: the recipe
    of the any-rate compressor of each arch of ``any_archs`` (:func:`plan_any`), planned
    under ``any`` and counted in the totals."""
    if isinstance(dialogues, bool) or not isinstance(dialogues, int) or dialogues < 1:
        raise ValueError(f"dialogues={dialogues!r}: expected an int >= 1")
    models = {} if models is None else models
    unknown = sorted(set(any_archs) - {i.arch for i in inputs})
    if unknown:
        raise ValueError(f"any_archs: {unknown} not among the grid's archs")
    archs, cells, anys = [], [], []
    for inp in inputs:
        if inp.arch not in models:  # once per arch: every rate's probes share it
            models[inp.arch] = memory.meta_model(inp.config)
        model = models[inp.arch]
        archs.append(plan_arch(inp, cfg_for(inp.arch, rates[0]), dialogues=dialogues, setup=setup))
        for rate in rates:
            cfg = cfg_for(inp.arch, rate)
            cells.append(plan_cell(inp, rate, cfg, dialogues=dialogues, setup=setup, model=model))
        if inp.arch in any_archs:
            cfg = any_for(inp.arch)
            anys.append(plan_any(inp, cfg, dialogues=dialogues, setup=setup, model=model))
    first = cfg_for(inputs[0].arch, rates[0])
    return {
        "setup": {**asdict(setup), "gpu": asdict(setup.gpu)},
        "dialogues": dialogues,
        "epochs": first.epochs,
        "batch_size": first.batch_size,
        "activation_checkpointing": first.activation_checkpointing,
        "visual_tokens": first.visual_tokens,
        "archs": archs,
        "cells": cells,
        "any": anys,
        "total_gpu_h": sum(a["build_gpu_h"] for a in archs) + sum(c["gpu_h"] for c in cells + anys),
        "total_wall_h": sum(a["build_wall_h"] for a in archs)
        + sum(c["wall_h"] for c in cells + anys),
        "total_disk_bytes": sum(a["token_store_bytes"] + a["targets_bytes"] for a in archs),
    }


def _size(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("TiB", 1024**4), ("GiB", _GIB), ("MiB", _MIB)):
        if x >= scale or unit == "MiB":
            return f"{x / scale:.3g} {unit}" if x else "0"
    return str(x)


def _num(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def _hours(h: float) -> str:
    """Hours as hours, minutes or seconds, 3 significant digits."""
    if h >= 1:
        return f"{_num(h)} h"
    return f"{h * 60:.3g} min" if h >= 1 / 60 else f"{h * 3600:.3g} s"


def format_plan(plan: dict, *, label: str = "") -> str:
    """The plan as markdown: its assumptions, the store per arch, the cells, the totals."""
    s, gpu = plan["setup"], plan["setup"]["gpu"]
    cells = plan["cells"]
    per_rank = cells[0]["per_rank_batch"] if cells else plan["batch_size"]
    budgets = {c["budget_bytes"] for c in cells}
    budget = _size(budgets.pop()) if len(budgets) == 1 else "per cell"
    lines = [
        f"Plan{f' of {label}' if label else ''}: {plan['dialogues']:,} training dialogues x "
        f"{plan['epochs']} epochs, batch {plan['batch_size']} on {s['gpus']} x {gpu['name']} "
        f"({per_rank} per rank); activation checkpointing "
        f"{'on' if plan['activation_checkpointing'] else 'off'}, visual tokens "
        f"{plan['visual_tokens']}.",
        f"GPU: {gpu['tflops']:g} TFLOP/s peak dense bf16, {_size(gpu['memory'])}; memory budget "
        f"{budget} per GPU (its memory less max(2 GiB, 10%), or train.max_memory_gib).",
        f"Assumed: model-FLOP utilisation {s['utilization']:g}; backward = "
        f"{s['backward_factor']:g} x forward FLOPs; sequences at the longest dialogue; the "
        "store built by one rank.",
        "",
        "| arch | visual tokens / image | text tokens | answer tokens | token store | targets "
        "| store build: GPU time | shapes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sources = list(dict.fromkeys(a["shapes"] for a in plan["archs"]))
    for a in plan["archs"]:
        lines.append(
            f"| {a['arch']} | {a['visual_tokens']} | {a['text_tokens']} | {a['answer_tokens']} "
            f"| {_size(a['token_store_bytes'])} | {_size(a['targets_bytes'])} "
            f"| {_hours(a['build_gpu_h'])} | [{sources.index(a['shapes']) + 1}] |"
        )
    lines += ["", *(f"[{i}] {text}" for i, text in enumerate(sources, start=1))]
    lines += [
        "",
        "| cell | kept m | seq len | micro-batch x steps | peak / GPU | fits | TFLOP / step "
        "| steps | GPU time | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells + plan["any"]:
        micro = f"{c['micro_batch']} x {c['accumulation']}" if c["micro_batch"] else "-"
        fits = "yes" if c["fits"] else f"NO: {c['note']}"
        any_rate = c["rate"] == "any"
        # An any-rate compressor: its span, and at most the lowest rate's m (its costliest step).
        at = f"any ({min(c['rates']):g}-{max(c['rates']):g})" if any_rate else f"{c['rate']:g}"
        kept = f"<= {c['kept']}" if any_rate else c["kept"]
        lines.append(
            f"| {c['arch']} @ {at} | {kept} | {c['seq_len']} | {micro} "
            f"| {_size(c['peak_bytes'])} | {fits} | {_num(c['flops_per_step'] / 1e12)} "
            f"| {c['steps']:,} | {_hours(c['gpu_h'])} | {_hours(c['wall_h'])} |"
        )
    lines += [
        "",
        f"Total: {_num(plan['total_gpu_h'])} GPU-hours, {_hours(plan['total_wall_h'])} wall on "
        f"{s['gpus']} x {gpu['name']} (cells one after another"
        + (", any-rate compressors included" if plan["any"] else "")
        + "), disk "
        f"{_size(plan['total_disk_bytes'])}.",
    ]
    return "\n".join(lines)
