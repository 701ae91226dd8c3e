"""Training a compressor against the frozen LVLM (the MetaCompress recipe).

Loss per batch of gold 3-turn dialogues (teacher forcing, one pass per dialogue), computed by
``mc_core.training.losses.total_loss``:

    KL(p_full || p_comp) over every answer token of every turn
      + lambda_ent * mean row entropy of P + lambda_col * max column sum of P

The distillation target is the same frozen LVLM with all visual tokens. Its answer positions
and the compressed model's are aligned from the end of each sequence
(``mc_core.training.losses.align_from_end``: they differ by n - m visual tokens).

Everything the frozen model contributes is computed once per dialogue
(`mc_core.training.targets`); each step then runs only the compressor and the compressed
forward.

Training state (compressor weights, optimizer, step, RNG) is checkpointed atomically every
`checkpoint_every` steps into `out_dir`; calling `train` again with the same arguments resumes
from it, and the batch order is a pure function of (seed, epoch), so a resumed run ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mc_core.compressors import Compressor, build
from mc_core.inference.dialogue import collate, to_device
from mc_core.models.families import adapter_for
from mc_core.progress import progress as progress_bar
from mc_core.runtime import prepare_model, resolve_device, token_dim
from mc_core.training import distributed, fit
from mc_core.training import rates as step_rates
from mc_core.training.activations import checkpointed_layers
from mc_core.training.config import TrainConfig
from mc_core.training.guards import check_cache, check_loss, clip
from mc_core.training.losses import align_from_end, total_loss
from mc_core.training.state import has_state, load_state, save_state
from mc_core.training.targets import (
    CacheEntry,
    TargetCache,
    batch_target,
    build_target_cache,
    ctx_to,
    dataset_rows,
    frozen_entries,
    pad_id,
    recompute_tokens,
)

__all__ = ["Callback", "TrainConfig", "auto_micro_batch", "student_logits", "train"]

Callback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------------
# The student


def student_logits(
    model,
    adapter,
    compressor,
    entries: Sequence[CacheEntry],
    *,
    pad_token_id: int,
    device,
    rate: float | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Compressed forward over cached dialogues: answer logits `[sum T, V]` and every P.

    The compressed answer positions are the full ones shifted by the visual tokens removed
    before them (`losses.align_from_end`). `rate`: compress at it (None: the compressor's).
    """
    rows, ps = [], []
    dtype = next(model.parameters()).dtype
    for e in entries:
        tokens = [t.to(device=device, dtype=torch.float32) for t in e.tokens]
        ys, p = compressor(tokens, [ctx_to(c, device) for c in e.contexts], rate=rate)
        ps += p
        base = to_device(e.base, device, dtype)
        rows.append(adapter.inputs_with(base, [y.to(dtype) for y in ys], P=p))
    adapter.reset_state()
    batch, _ = collate(rows, pad_token_id=pad_token_id, side="right")
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for i, (e, r) in enumerate(zip(entries, rows, strict=True)):
        mask[i, align_from_end(e.positions, e.length, r["input_ids"].shape[1])] = True
    logits = model(**batch, logits_to_keep=mask.to(device), use_cache=False).logits  # (sum T, V)
    return logits, ps


# ---------------------------------------------------------------------------------------------
# The loop


def _order(n: int, seed: int, epoch: int) -> Tensor:
    # A pure function of (seed, epoch): resuming mid-epoch sees the same batches.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train(
    cfg: TrainConfig,
    model,
    processor,
    dataset,
    *,
    rate: float | None = None,
    out_dir: str | os.PathLike | None = None,
    callbacks: Sequence[Callback] | None = None,
    cache: TargetCache | None = None,
    adapter=None,
) -> Compressor:
    """Train a compressor for `rate` (or every rate of `cfg.rates`) on `dataset` against the
    frozen `model`.

    Args:
        cfg: the run's settings (`cfg.method` and `cfg.compressor_kwargs` choose the method).
        model: the LVLM; frozen (`eval`, `requires_grad_(False)`) and moved to the device.
        processor: its processor.
        dataset: dialogue rows (schema of `mc_core.data.schema`).
        rate: reduction rate in (0, 1). With `cfg.rates` (each step draws its rate,
            `mc_core.training.rates`) the compressor's nominal rate: None gives
            `rates.nominal_rate(cfg.rates)`, a given one must lie within the rates' span.
        out_dir: where training state is checkpointed; an existing checkpoint there is resumed.
            None: no checkpoints.
        callbacks: called as `cb(step, metrics)` every `cfg.log_every` steps and at the end;
            `metrics` holds loss, kl, entropy, collapse, grad_norm, epoch, samples_per_s (of the
            whole batch, the same on every rank of a process group: give side effects to rank 0).
        cache: a `TargetCache` of this model on `dataset` (built here when None and
            `cfg.cache_targets`).
        adapter: the family adapter (default `adapter_for(model)`).

    Under a ``torch.distributed`` process group (``mc_core.training.distributed``) every rank calls
    this
    with the same arguments: each step's batch is split across the ranks, their gradients are
    summed, and every replica takes the step of one process on the whole batch (up to float
    summation order). Only rank 0 writes checkpoints to `out_dir`; all ranks resume from it.

    Returns:
        The trained compressor (float32, eval mode, on the training device); with
        `cfg.rates` its `trained_rates` holds them (a checkpoint records them).

    Raises:
        ValueError: bad rate, empty dataset, cache of another size or target_topk, or a
            checkpoint in `out_dir` written with other settings.
        RuntimeError: the loss or gradient became NaN/inf, or the loss exploded.
    """
    rate = _nominal(cfg, rate)
    run = _Run.start(cfg, model, processor, dataset, rate=rate, cache=cache, adapter=adapter)
    if cfg.rates is not None:  # what the checkpoint records: the rates it serves
        run.compressor.trained_rates = tuple(cfg.rates)
    info = {"config": cfg.fingerprint(), "rate": float(rate), "dataset_size": run.n}
    state_dir = Path(out_dir) if out_dir is not None else None
    step, first_loss = _resume(state_dir, run, info)
    callbacks = list(callbacks or [])
    bar = progress_bar(
        total=run.total,
        initial=step,
        # An any-rate run draws its rate per step: name the span, not the nominal rate.
        desc=f"train r={rate}"
        if cfg.rates is None
        else f"train r={min(cfg.rates)}-{max(cfg.rates)}",
        disable=not cfg.progress or run.rank != 0,
    )
    with checkpointed_layers(model, cfg.activation_checkpointing):
        step = _steps(run, step, first_loss, state_dir, info, callbacks, bar)
    bar.close()
    if run.world > 1:  # rank 0's last checkpoint is on disk before any rank resumes from it
        distributed.barrier()
    return run.compressor.eval()


def _nominal(cfg: TrainConfig, rate: float | None) -> float:
    """The rate the compressor is built at: `rate`, or with `cfg.rates` their nominal rate."""
    if cfg.rates is None:
        if rate is None:
            raise ValueError("train needs rate= (or train.rates for an any-rate compressor)")
        return rate
    if rate is None:
        return step_rates.nominal_rate(cfg.rates)
    lo, hi = min(cfg.rates), max(cfg.rates)
    if not lo <= rate <= hi:
        raise ValueError(f"rate={rate!r}: outside train.rates={cfg.rates} (its span {lo}-{hi})")
    return rate


def _steps(run: _Run, step, first_loss, state_dir, info, callbacks, bar) -> int:
    """The optimiser steps from ``step`` to the end, checkpointing and reporting as they go."""
    cfg = run.cfg
    t_start, samples = time.perf_counter(), 0
    while step < run.total:
        epoch, k = divmod(step, run.steps_per_epoch)
        idx = _order(run.n, cfg.seed, epoch)[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        # The whole step at one rate (mc_core.training.rates says why); None: the built rate.
        rate = None if cfg.rates is None else step_rates.step_rate(cfg.rates, cfg.seed, step)
        metrics = run.step(idx.tolist(), step, first_loss, rate)
        if rate is not None:
            metrics["rate"] = rate
        first_loss = metrics["loss"] if first_loss is None else first_loss
        step += 1
        samples += len(idx)
        bar.update(1)
        metrics["epoch"] = float(epoch)
        metrics["samples_per_s"] = samples / max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}")
        if step % cfg.log_every == 0 or step == run.total:
            for cb in callbacks:
                cb(step, metrics)
        saving = state_dir is not None and run.rank == 0  # the replicas are identical
        if saving and (step % cfg.checkpoint_every == 0 or step == run.total):
            save_state(state_dir, run.compressor, run.opt, step, {**info, "first_loss": first_loss})
    return step


def _resume(state_dir: Path | None, run: _Run, info: dict[str, Any]) -> tuple[int, float | None]:
    """The step and first loss to continue from: a checkpoint's in `state_dir`, else (0, None)."""
    step, first_loss = 0, None
    if state_dir is not None and has_state(state_dir):
        step, saved = load_state(state_dir, run.compressor, run.opt, info)
        first_loss = saved.get("first_loss")
    if run.world > 1:  # a rank that missed the checkpoint (out_dir not shared) would deadlock
        distributed.agree(step, "the step to resume from (is out_dir shared?)", run.device)
    return step, first_loss


@dataclass
class _Run:
    """What one training run holds between steps: the frozen model, compressor, optimizer."""

    cfg: TrainConfig
    model: Any
    processor: Any
    dataset: Any
    adapter: Any
    compressor: Compressor
    opt: torch.optim.Optimizer
    params: list[Tensor]
    cache: TargetCache | None
    device: torch.device
    pad_id: int
    n: int
    steps_per_epoch: int
    total: int
    rank: int = 0
    world: int = 1
    micro: int | None = None  # the micro-batch "auto" chose (None: cfg.micro_batch as it is)

    @classmethod
    def start(
        cls,
        cfg: TrainConfig,
        model,
        processor,
        dataset,
        *,
        rate: float,
        cache: TargetCache | None,
        adapter,
    ) -> _Run:
        """Freeze the model, build the compressor and optimizer, check or build the cache."""
        device = resolve_device(cfg.device)
        prepare_model(model, device, cfg.dtype)
        adapter = adapter if adapter is not None else adapter_for(model)
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty: nothing to train on")
        torch.manual_seed(cfg.seed)
        compressor = build(cfg.method, rate=rate, dim=token_dim(model), **cfg.build_kwargs())
        if not compressor.trainable:
            raise ValueError(f"train.method={cfg.method!r} has no trainable parameters")
        compressor = compressor.float().to(device).train()
        params = [p for p in compressor.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        built = cache is None and cfg.cache_targets
        if built:
            cache = build_target_cache(
                model,
                processor,
                dataset,
                needs=compressor.needs,
                adapter=adapter,
                batch_size=cfg.target_batch,
                device=device,
                progress=cfg.progress,
                topk=cfg.target_topk,
                dtype=cfg.dtype,
                targets=cfg.targets,
            )
        check_cache(cache, n, compressor.needs, cfg.method, cfg.target_topk)
        world = distributed.world()
        micro = auto_micro_batch(cfg, model, compressor, cache, world=world[1])[0]
        if built and cfg.visual_tokens == "recompute":  # keep what a store would: no tokens
            for e in cache.entries:
                e.tokens = []
            cache.visual_tokens = "recompute"
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        return cls(
            cfg,
            model,
            processor,
            dataset,
            adapter,
            compressor,
            opt,
            params,
            cache,
            device,
            pad_id(processor),
            n,
            steps_per_epoch,
            total,
            *world,
            micro,
        )

    def entries(self, idx: list[int]) -> list[CacheEntry]:
        """The batch's cached entries, or freshly computed ones when caching is off."""
        if self.cache is not None:
            entries = [self.cache.entries[i] for i in idx]
            if self.cache.visual_tokens == "recompute":  # the tower runs again for this step
                # copies: the step's tokens must not stay in an in-memory cache's entries
                entries = [dataclasses.replace(e) for e in entries]
                rows = dataset_rows(self.dataset, idx)
                recompute_tokens(
                    self.model, self.processor, self.adapter, entries, rows, self.device
                )
            return entries
        return frozen_entries(
            self.model,
            self.processor,
            self.adapter,
            dataset_rows(self.dataset, idx),
            self.compressor.needs,
            self.device,
            f"dataset rows {idx[:4]}",
            self.cfg.target_topk,
            targets=self.cfg.targets,
        )

    def micro_size(self, per_rank: int) -> int:
        """Dialogues per forward pass for a rank's share of ``per_rank`` dialogues."""
        mb = self.cfg.micro_batch if self.micro is None else self.micro
        return per_rank if mb is None or mb == "auto" else max(1, min(int(mb), per_rank))

    def step(
        self, idx: list[int], step: int, first_loss: float | None, rate: float | None = None
    ) -> dict[str, float]:
        """One SGD step on the dialogues ``idx`` (the whole batch, in every rank) at ``rate``
        (None: the compressor's own); returns the batch's metrics.

        The rank's share is run in micro-batches (``TrainConfig.micro_batch``), each backward
        adding its part of the gradient: a micro-batch holding ``T_c`` of the step's ``T`` answer
        tokens and ``I_c`` of its ``I`` images weighs its mean KL by ``T_c / T`` and its mean
        regularisers by ``I_c / I``, so the accumulated gradient is that of one forward over the
        whole batch (over every rank: the counts are summed over the process group first).
        """
        cfg = self.cfg
        mine = distributed.shard(idx, self.rank, self.world)
        size = self.micro_size(len(mine))
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
        ready = None if self.cache is not None else self.entries(mine)  # counts need them all
        counts = self._counts(mine, ready)
        totals = counts if self.world == 1 else tuple(distributed.all_sum(counts, self.device))
        self.opt.zero_grad(set_to_none=True)
        sums, parts = [0.0, 0.0, 0.0], {}
        for k, chunk in enumerate(chunks):
            entries = self.entries(chunk) if ready is None else ready[k * size : (k + 1) * size]
            parts, c = self._backward(entries, totals, rate)
            sums = [s + parts[k] * c[j] for s, k, j in zip(sums, _PARTS, (0, 1, 1), strict=True)]
        if self.world > 1 or len(chunks) > 1:  # one chunk in one process: its parts as they are
            parts = _batch_parts(cfg, sums, counts, self.world, self.device)
        check_loss(parts["loss"], first_loss, step, cfg)
        if self.world > 1:  # every replica then clips and steps on the whole batch's gradient
            distributed.sum_grads(self.params)
        grad_norm = clip(self.params, cfg)
        if not math.isfinite(grad_norm):
            raise RuntimeError(
                f"gradient norm became {grad_norm} at step {step + 1} (loss {parts['loss']:.4g}):"
                f" lower train.lr (now {cfg.lr}) and keep gradient clipping on (grad_clip, now "
                f"{cfg.grad_clip})"
            )
        self.opt.step()
        return {**parts, "grad_norm": grad_norm}

    def _counts(self, idx: list[int], entries: list[CacheEntry] | None) -> tuple[int, int]:
        """Answer tokens and images of the dialogues ``idx`` (the KL's and regularisers'
        denominators), read without loading their tensors where the cache can."""
        if entries is None:
            counts = [self.cache.counts(i) for i in idx]
        else:
            counts = [(len(e.positions), len(e.contexts)) for e in entries]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _backward(
        self, entries: list[CacheEntry], totals: tuple[int, int], rate: float | None = None
    ) -> tuple[dict[str, float], tuple[int, int]]:
        """Forward and backward of one micro-batch, its loss weighted by its share of the
        step's answer tokens and images; returns its own mean parts and its counts."""
        cfg = self.cfg
        logits, ps = student_logits(
            self.model,
            self.adapter,
            self.compressor,
            entries,
            pad_token_id=self.pad_id,
            device=self.device,
            rate=rate,
        )
        counts = (logits.shape[0], len(ps))
        # Both shares are exactly 1 for a whole batch in one process, whose loss is then
        # bit-identical to an unweighted one.
        w_kl, w_reg = counts[0] / totals[0], counts[1] / totals[1]
        target = batch_target(entries, self.device)
        reg = w_reg / w_kl  # lambdas rescaled so that w_kl * loss = w_kl * KL + w_reg * regs
        loss, parts = total_loss(
            target,
            logits.float(),
            ps,
            lambda_ent=cfg.lambda_ent * reg,
            lambda_col=cfg.lambda_col * reg,
        )
        (loss * w_kl).backward()
        return parts, counts


def _batch_parts(
    cfg: TrainConfig, sums: list[float], counts: tuple[int, int], world: int, device
) -> dict[str, float]:
    """The whole batch's kl / entropy / collapse / loss from the token- and image-weighted
    sums of its micro-batches' means (over every rank)."""
    values = [*sums, *counts]
    if world > 1:
        values = distributed.all_sum(values, device)
    kl, ent, col, tokens, images = values
    out = {"kl": kl / tokens, "entropy": ent / images, "collapse": col / images}
    out["loss"] = out["kl"] + cfg.lambda_ent * out["entropy"] + cfg.lambda_col * out["collapse"]
    return out


_PARTS = ("kl", "entropy", "collapse")  # weighted by answer tokens, images, images


def auto_micro_batch(
    cfg: TrainConfig, model, compressor: Compressor, cache: TargetCache | None, *, world: int = 1
) -> tuple[int | None, dict[str, Any] | None]:
    """The micro-batch ``cfg.micro_batch: auto`` stands for, with the estimate it was chosen
    by: the largest that fits ``cfg.max_memory_gib`` (default: the device's free memory less a
    margin) for the costliest step of ``cache``'s dialogues (`mc_core.training.fit`). Without a
    budget (CPU) the rank's whole batch. ``(None, None)`` when ``cfg.micro_batch`` is not
    "auto".

    Raises:
        ValueError: "auto" without a target cache to read the dialogues' shapes from, or a
            micro-batch of one does not fit (the message says what to change).
    """
    if cfg.micro_batch != "auto":
        return None, None
    per_rank = math.ceil(cfg.batch_size / world)
    budget = fit.memory_budget(resolve_device(cfg.device), cfg.max_memory_gib)
    if budget is None:
        return per_rank, None
    if cache is None:
        raise ValueError(
            "train.micro_batch='auto' reads the dialogues' shapes from the target cache: set "
            "train.cache_targets: true or give an int micro_batch"
        )
    kept = compressor.kept if cfg.rates is None else step_rates.costliest_kept(cfg.rates)
    shapes = cache.step_shapes(kept)
    return fit.fit_micro_batch(
        model,
        batch_size=per_rank,
        budget_bytes=budget,
        seq_len=shapes["seq_len"],
        answer_tokens=shapes["answer_tokens"],
        images_per_dialogue=shapes["images"],
        visual_tokens=shapes["visual_tokens"],
        dtype=next(model.parameters()).dtype,
        generator_params=sum(p.numel() for p in compressor.parameters()),
        target_topk=cfg.target_topk,
        activation_checkpointing=cfg.activation_checkpointing,
        vision=cfg.visual_tokens,
    )
