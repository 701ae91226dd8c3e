"""The three-stage teacher recipe (see the package docstring); budgets are steps.

Every random draw of step s of stage k comes from a generator seeded by (seed, k, s), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have. What each step
trains on comes from ``feed``; this module optimises, checkpoints and measures the curve.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mc_core.data import synthetic as S
from mc_core.models import families, zoo
from mc_core.training.teacher.aids import Aids, aid_losses, label_loss
from mc_core.training.teacher.batch import Row, build_batch
from mc_core.training.teacher.config import TeacherConfig
from mc_core.training.teacher.evaluation import evaluate
from mc_core.training.teacher.feed import Feed
from mc_core.training.teacher.layout import layout_for
from mc_core.training.teacher.state import TrainState
from mc_core.training.teacher.weights import init_from, init_positions

__all__ = ["lr_factor", "train_teacher"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class _Trainer:
    """One teacher run: the model, its aids, its data (``feed``) and the resumable state."""

    def __init__(
        self,
        model,
        processor,
        cfg: TeacherConfig,
        world: S.WorldConfig,
        state: TrainState,
        ckpt: Path,
        emit: Callable[[dict], None],
        progress: bool,
    ):
        self.model, self.processor, self.cfg, self.world = model, processor, cfg, world
        self.state, self.ckpt, self.emit, self.progress = state, ckpt, emit, progress
        self.adapter = families.adapter_for(model)
        self.layout = layout_for(model, world, processor)
        self.aids = Aids(model.config.text_config.hidden_size, world)
        if state.aids is not None:
            self.aids.load_state_dict(state.aids)
        self.rotary = not hasattr(getattr(model.model, "vision_tower", None), "embeddings")
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_id = self.adapter.image_token_id
        # The feed builds the augmenter's compressors: after the aids, as they always were.
        self.feed = Feed(processor, self.adapter, self.layout, cfg, world, state)
        self.vision_params = [
            p
            for n, p in model.named_parameters()
            if not n.startswith(("model.language_model", "lm_head"))
        ]
        self.llm_params = [
            p
            for n, p in model.named_parameters()
            if n.startswith(("model.language_model", "lm_head"))
        ]

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, opt=None) -> None:
        s = self.state
        s.model, s.aids = self.model.state_dict(), self.aids.state_dict()
        s.opt = opt.state_dict() if opt is not None else None
        s.save(self.ckpt)

    def optimiser(self, params: list, lr: float, stage: int) -> torch.optim.AdamW:
        opt = torch.optim.AdamW(
            params, lr=lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.98)
        )
        if self.state.opt is not None and self.state.stage == stage:
            opt.load_state_dict(self.state.opt)
        return opt

    def next_stage(self) -> None:
        self.state.stage, self.state.step = self.state.stage + 1, 0
        self.save()
        self.emit({"event": "stage", "stage": self.state.stage - 1})

    # -- stage 1: tower + projector on dense labels ---------------------------------------
    def stage1(self) -> None:
        from mc_core.progress import progress as progress_bar

        c, s = self.cfg, self.state
        opt = self.optimiser(self.vision_params, c.stage1_lr, 1)
        self.model.train()
        bar = progress_bar(
            total=c.stage1_steps, initial=s.step, desc="stage 1 (vision)", disable=not self.progress
        )
        while s.step < c.stage1_steps:
            rng = np.random.default_rng([c.seed, 1, s.step])
            pool = self.feed.pool
            examples = [pool[int(i)] for i in rng.choice(len(pool), c.stage1_batch, replace=False)]
            feats = torch.cat(self.feed.tokens([e.image for e in examples]))
            loss, accs = label_loss(self.aids, feats, examples, rotary=self.rotary)
            self._update(
                opt,
                self.vision_params,
                loss,
                c.stage1_lr * lr_factor(s.step, min(20, c.warmup_steps), c.stage1_steps),
            )
            bar.update(1)
            if s.step % c.checkpoint_every == 0:
                self.save(opt)
            self.emit({"event": "step", "stage": 1, "step": s.step, "loss": loss.item(), **accs})
        bar.close()
        self.next_stage()

    def _update(self, opt, params, loss, lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        self.state.step += 1

    # -- stages 2 and 3: the LLM -----------------------------------------------------------
    def llm_loss(self, rows: list[Row]) -> tuple[torch.Tensor, dict[str, float]]:
        """Answer + end-of-turn cross-entropy over all rows; the aids on the whole rows."""
        total = sum(len(r.ans_pos) for r in rows)
        loss, logs = torch.zeros(()), {}
        for group in ([r for r in rows if r.aids], [r for r in rows if not r.aids]):
            if not group:
                continue
            b = build_batch(group, self.pad_id)
            with_aids = group[0].aids is not None
            self.adapter.reset_state()
            out = self.model(
                **b.inputs, output_attentions=with_aids, output_hidden_states=with_aids
            )
            r, p = b.ans_pos[:, 0], b.ans_pos[:, 1]
            ce = F.cross_entropy(out.logits[r, p], b.ans_ids, reduction="sum") + F.cross_entropy(
                out.logits[r, p + 1], b.end_ids, reduction="sum"
            )
            loss = loss + ce / total
            logs["ce_" + ("whole" if with_aids else "reduced")] = ce.item() / len(b.ans_ids)
            if with_aids:
                aid = aid_losses(
                    self.aids,
                    out,
                    b,
                    rotary=self.rotary,
                    image_token_id=self.image_id,
                    pointer_layers=self.cfg.pointer_layers,
                )
                loss = (
                    loss
                    + self.cfg.attn_weight * aid["att"]
                    + self.cfg.slot_weight * (aid["slot"] + aid.get("pos", 0.0))
                )
                logs.update({k: v.item() for k, v in aid.items()})
        return loss, logs

    def curve_point(self, curve_rows: list[Row]) -> float:
        self.model.eval()
        acc = _accuracy(self.model, self.adapter, curve_rows, self.pad_id)
        self.state.curve.append([self.state.stage, self.state.step, round(acc, 4)])
        self.emit(
            {"event": "curve", "stage": self.state.stage, "step": self.state.step, "acc": acc}
        )
        self.model.train()
        return acc

    def llm_stage(self, stage: int) -> None:
        """Stage 2 (the scene pool, whole tokens) or 3 (fresh scenes, reduction augmented)."""
        from mc_core.progress import progress as progress_bar

        c, s = self.cfg, self.state
        steps, batch, lr = (
            (c.stage2_steps, c.stage2_batch, c.stage2_lr)
            if stage == 2
            else (c.stage3_steps, c.stage3_batch, c.stage3_lr)
        )
        for p in self.vision_params:
            p.requires_grad_(False)
        params = (
            self.llm_params + list(self.aids.slots.parameters()) + list(self.aids.pos.parameters())
        )
        opt = self.optimiser(params, lr, stage)
        feats = self.feed.frozen_tokens(self.feed.pool) if stage == 2 and s.step < steps else None
        curve_rows = self.feed.held_out_rows() if s.step < steps else []
        bar = progress_bar(
            total=steps, initial=s.step, desc=f"stage {stage} (LLM)", disable=not self.progress
        )
        self.model.train()
        while s.step < steps:
            if (
                s.step % c.curve_every == 0
                and self.curve_point(curve_rows) >= c.target_acc
                and stage == 2
            ):
                break
            rng = np.random.default_rng([c.seed, stage, s.step])
            loss, logs = self.llm_loss(self.feed.llm_rows(stage, s.step, batch, feats, rng))
            self._update(opt, params, loss, lr * lr_factor(s.step, c.warmup_steps, steps))
            bar.update(1)
            bar.set_postfix({k: f"{v:.2f}" for k, v in logs.items()})
            if s.step % c.checkpoint_every == 0:
                self.save(opt)
            self.emit(
                {"event": "step", "stage": stage, "step": s.step, "loss": loss.item(), **logs}
            )
        bar.close()
        if curve_rows and (not s.curve or s.curve[-1][:2] != [stage, s.step]):
            self.curve_point(curve_rows)
        self.next_stage()


def _accuracy(model, adapter, rows: list[Row], pad_id: int) -> float:
    """Answer accuracy over ``rows`` (the argmax at each answer position), 32 rows a batch."""
    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            b = build_batch(rows[i : i + 32], pad_id)
            adapter.reset_state()
            logits = model(**b.inputs).logits
            pred = logits[b.ans_pos[:, 0], b.ans_pos[:, 1]].argmax(-1)
            hits += int((pred == b.ans_ids).sum())
    return hits / sum(len(r.ans_pos) for r in rows)


def train_teacher(
    arch: str,
    out_dir: str | os.PathLike,
    cfg: TeacherConfig | None = None,
    *,
    world: S.WorldConfig | None = None,
    spec: zoo.TinySpec | None = None,
    callbacks: list[Callable[[dict], None]] | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Trains a tiny architecture into a teacher, saves it to ``out_dir``, returns its report.

    Args:
        arch: a name in ``zoo.TINY``.
        out_dir: where the plain transformers model + processor are saved (``zoo.save``);
            ``<out_dir>-ckpt.pt`` beside it holds the resumable state while training.
        cfg: the recipe (``arch_overrides`` applied here).
        world: the synthetic world (default ``WorldConfig()``).
        spec: other sizes for the architecture (tests).
        callbacks: called with event dicts (``{"event": "step"|"curve"|"stage"|"done", ...}``).
        progress: show progress bars.
        meta: extra facts for the saved model's ``zoo.json`` (e.g. the pipeline's recipe_sha).

    Returns:
        The report of :func:`mc_core.training.teacher.evaluate` plus ``arch``, ``steps`` (per
        stage), ``curve`` (``[stage, step, held-out accuracy]``), ``recipe`` and ``world``.
    """
    name = spec.name if spec else arch
    cfg = (cfg or TeacherConfig()).for_arch(name)
    world = world or S.WorldConfig()
    out_dir = Path(out_dir)
    ckpt = out_dir.parent / f"{out_dir.name}-ckpt.pt"

    def emit(event: dict) -> None:
        for cb in callbacks or []:
            cb(event)

    model, processor, state = _start(spec or arch, name, cfg, world, ckpt)
    torch.manual_seed(cfg.seed)
    trainer = _Trainer(model, processor, cfg, world, state, ckpt, emit, progress)
    if state.stage == 1:
        trainer.stage1()
    for stage in (2, 3):
        if state.stage == stage:
            trainer.llm_stage(stage)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    report = _report(model, processor, name, cfg, world, state, progress)
    zoo.save(
        model,
        processor,
        out_dir,
        meta={"arch": name, "world": world.to_dict(), "acc_avg": report["acc_avg"], **(meta or {})},
    )
    ckpt.unlink(missing_ok=True)
    emit({"event": "done", **{k: v for k, v in report.items() if k != "curve"}})
    return report


def _start(
    arch: str | zoo.TinySpec, name: str, cfg: TeacherConfig, world: S.WorldConfig, ckpt: Path
) -> tuple:
    """``(model, processor, state)`` to train from: the checkpoint at ``ckpt`` when it is this
    very run's, else a fresh state and initial weights. The pointer layers are checked first."""
    model, processor = zoo.build(arch, seed=cfg.seed, attn_implementation="eager")
    depth = int(model.config.get_text_config().num_hidden_layers)
    if any(not -depth <= k < depth for k in cfg.pointer_layers):
        raise ValueError(
            f"base.pointer_layers={list(cfg.pointer_layers)}: {name}'s LLM has {depth} layers "
            f"(indices {-depth}..{depth - 1})"
        )
    recipe = TrainState.fingerprint(cfg.model_dump(), world.to_dict(), model.config.to_dict())
    state = TrainState.load(ckpt, name, recipe)
    if state is None:
        state = TrainState(name, recipe)
        init_positions(model)
        if cfg.init_from:
            init_from(model, cfg.init_from)
    else:
        model.load_state_dict(state.model)
    return model, processor, state


def _report(
    model,
    processor,
    name: str,
    cfg: TeacherConfig,
    world: S.WorldConfig,
    state: TrainState,
    progress: bool,
) -> dict:
    """The trained model's held-out report (``evaluate``) with the run's facts."""
    report = evaluate(
        model,
        processor,
        world,
        n_dialogues=cfg.eval_dialogues,
        seed=cfg.eval_seed,
        progress=progress,
    )
    report.update(
        arch=name,
        steps={
            "stage1": cfg.stage1_steps,
            "stage2": _stage_steps(state.curve, 2, cfg.stage2_steps),
            "stage3": cfg.stage3_steps,
        },
        curve=state.curve,
        recipe=cfg.model_dump(mode="json"),
        world=world.to_dict(),
    )
    return report


def _stage_steps(curve: list, stage: int, budget: int) -> int:
    """Steps a stage ran: its budget, or where its curve stopped it early."""
    points = [p[1] for p in curve if p[0] == stage]
    return int(max(points)) if points and max(points) < budget else budget
