"""The ceilings of a cell, measured with the evaluation loop: the ground-truth selector, the
per-dialogue oracle P and the oracle's overlap with the [CLS]-attention top tokens.

The machinery (plans, the oracle fit, the overlap) is `mc_core.evaluation.ceilings`; this
module runs it over a cell's dialogues and reports it like a method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mc_core.compressors.ops import check_rate
from mc_core.evaluation.ceilings import (
    GT_COLUMN,
    PlanCompressor,
    cls_overlap,
    fixed_plan,
    oracle_matrix,
    selector_plan,
)
from mc_core.evaluation.runner import eval_rows, run_method, teacher_logits
from mc_core.models.families import adapter_for
from mc_core.runtime import prepare_model, resolve_device, token_dim

__all__ = ["evaluate_ceilings"]


def _fit_oracles(model, adapter, teacher: dict, rate: float, *, steps, lr, eps, seed):
    """One oracle P per subsampled dialogue; its fit KL and its [CLS] overlap with chance."""
    plans, kls, overlaps, chance = [], [], [], []
    for j in range(len(teacher)):
        inputs, positions, t_logits = teacher[j]
        P, kl = oracle_matrix(
            model,
            adapter,
            inputs,
            positions,
            t_logits,
            rate,
            steps=steps,
            lr=lr,
            eps=eps,
            seed=seed + j,
        )
        plans.append(fixed_plan(P))
        kls.append(kl)
        share = _cls_share(adapter, inputs, P)
        if share is not None:
            overlaps.append(share)
            chance.append(P.shape[0] / P.shape[1])
    return plans, kls, overlaps, chance


def _oracle(model, processor, adapter, rows, rate, dim, common, dialogues, *, steps, lr, eps, seed):
    """The oracle on a seeded subsample of `dialogues` rows, `none` on the same as its
    reference; also each fitted P's [CLS] overlap and its chance level."""
    k = min(int(dialogues), len(rows))
    pick = sorted(
        torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    )
    sub = [rows[i] for i in pick]
    teacher = {
        j: teacher_logits(model, processor, adapter, r, common["dev"]) for j, r in enumerate(sub)
    }
    plans, kls, overlaps, chance = _fit_oracles(
        model, adapter, teacher, rate, steps=steps, lr=lr, eps=eps, seed=seed
    )
    # Batches must replay plans in row order: one queue over the subsample.
    queue = PlanCompressor(rate=rate, dim=dim, plans=plans)
    oracle = run_method(
        model, processor, adapter, sub, lambda _s, _c: queue, teacher=teacher, **common
    )
    ref = run_method(model, processor, adapter, sub, lambda _s, _c: None, teacher=teacher, **common)
    oracle.update(
        {
            "dialogues": k,
            "indices": pick,
            "steps": int(steps),
            "lr": float(lr),
            "eps": float(eps),
            "fit_kl": sum(kls) / max(len(kls), 1),
            "none_acc_avg": ref["acc_avg"],
            "none_acc_avg_ci": ref["acc_avg_ci"],
        }
    )
    return oracle, overlaps, chance


def evaluate_ceilings(
    model,
    processor,
    dataset,
    rate: float,
    *,
    oracle_dialogues: int = 16,
    oracle_steps: int = 100,
    oracle_lr: float = 0.1,
    oracle_eps: float = 0.01,
    history: str = "model",
    max_dialogues: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int = 4,
    seed: int = 0,
    adapter=None,
) -> dict[str, Any]:
    """The cell's ceilings (`mc_core.evaluation.ceilings`): selector, oracle and the [CLS] overlap.

    The selector runs on the same dialogues as `evaluate` where the dataset has the optional
    `object_centres` column (else `{"available": False, "note": ...}`); the oracle on a seeded
    subsample of `oracle_dialogues` (`_oracle`); `cls_overlap` on the oracle's P.
    """
    check_rate(rate, where="ceilings rate")
    rows = eval_rows(dataset, max_dialogues)
    dev = resolve_device(device)
    prepare_model(model, dev)
    adapter = adapter if adapter is not None else adapter_for(model)
    dim = token_dim(model)
    common = {
        "history": history,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "dev": dev,
        "bar": None,
        "ci_seed": seed,
    }
    out: dict[str, Any] = {}
    if GT_COLUMN in rows[0]:
        out["selector"] = run_method(
            model,
            processor,
            adapter,
            rows,
            lambda _s, chunk: PlanCompressor(
                rate=rate, dim=dim, plans=[selector_plan(r[GT_COLUMN], rate) for r in chunk]
            ),
            teacher={},
            **common,
        )
    else:
        out["selector"] = {
            "available": False,
            "note": f"the dataset has no {GT_COLUMN!r} ground truth",
        }
    fit = {"steps": oracle_steps, "lr": oracle_lr, "eps": oracle_eps, "seed": seed}
    oracle, overlaps, chance = _oracle(
        model, processor, adapter, rows, rate, dim, common, oracle_dialogues, **fit
    )
    out["oracle"] = oracle
    out["cls_overlap"] = (
        {
            "share": sum(overlaps) / len(overlaps),
            "chance": sum(chance) / len(chance),
            "dialogues": len(overlaps),
        }
        if overlaps
        else {"available": False, "note": "the adapter gives no cls_attention"}
    )
    return out


def _cls_share(adapter, inputs, P: Tensor) -> float | None:
    """Figure 1 of the paper for one dialogue (None when the family has no [CLS] attention)."""
    try:
        with torch.no_grad():
            ctx = adapter.contexts(inputs, need=frozenset({"cls_attention"}))[0]
    except (ValueError, NotImplementedError):
        return None
    if ctx.cls_attention is None:
        return None
    return cls_overlap(P, ctx.cls_attention)
