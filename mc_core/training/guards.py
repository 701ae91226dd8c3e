"""The training loop's checks: the target cache fits the run, the loss and gradient are sane,
and gradient clipping (``mc_core.training.loop``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mc_core.training.config import TrainConfig
from mc_core.training.targets import TargetCache

__all__ = ["check_cache", "check_loss", "clip"]


def check_cache(
    cache: TargetCache | None, n: int, needs: frozenset[str], method: str, topk: int | None
) -> None:
    if cache is None:
        return
    if len(cache) != n:
        raise ValueError(f"target cache has {len(cache)} dialogues, dataset has {n}")
    if cache.topk != topk:
        # Another k is another objective (and a full cache would silently cost V / k the memory).
        raise ValueError(
            f"target cache holds top-{cache.topk} targets (None: full vocabulary) but "
            f"train.target_topk={topk!r}; rebuild it with build_target_cache(..., topk={topk!r})"
        )
    missing = set(needs) - set(cache.needs)
    if missing:
        raise ValueError(f"target cache lacks context fields {sorted(missing)} that {method} needs")


def check_loss(value: float, first: float | None, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(value):
        raise RuntimeError(
            f"loss became {value} at step {step + 1}: lower train.lr (now {cfg.lr}) and keep "
            f"gradient clipping on (grad_clip, now {cfg.grad_clip}); the collapse term diverges "
            "without clipping"
        )
    if first is not None and value > cfg.explode_factor * max(first, 1e-6):
        raise RuntimeError(
            f"loss exploded at step {step + 1}: {value:.4g} > {cfg.explode_factor} x the first "
            f"loss {first:.4g}; lower train.lr (now {cfg.lr}) or tighten grad_clip (now "
            f"{cfg.grad_clip})"
        )


def clip(params: list[Tensor], cfg: TrainConfig) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )
    if cfg.grad_clip is not None and math.isfinite(norm):
        if cfg.clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    return norm
