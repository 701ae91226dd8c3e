"""The base report: how a base model uses the image, on held-out dialogues.

The same batched conversations as `mc_core.evaluation.runner.evaluate`, under four conditions:
all tokens, a blank image of the same size, equidistant ``sample`` at a rate, and (where the
dataset has ``object_centres``) the ground-truth selector. A real teacher scores well with all
tokens, near chance blind, and clearly lower on a sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from mc_core.compressors import build
from mc_core.compressors.ops import check_rate
from mc_core.evaluation.ceilings import GT_COLUMN, PlanCompressor, selector_plan
from mc_core.evaluation.runner import eval_rows, row_images, run_method
from mc_core.models.families import adapter_for
from mc_core.progress import progress as progress_bar
from mc_core.runtime import prepare_model, resolve_device, token_dim

__all__ = ["base_report", "chance"]


def _blank_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with every image replaced by a uniform grey one of the same size."""

    grey = [Image.new("RGB", im.size, (128, 128, 128)) for im in row_images(row)]
    return {**row, "image": grey if isinstance(row["image"], list | tuple) else grey[0]}


def chance(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Majority-answer accuracy per question type (the best blind guess), where every turn has
    one gold answer and a question type; None otherwise (e.g. VQAv2's ten human answers)."""
    from mc_core.data.synthetic import chance_accuracy

    by_type: dict[str, list[str]] = {}
    for r in rows:
        types, sets = r.get("question_types") or [], r.get("answer_sets") or []
        if len(types) != len(sets) or any(len(s) != 1 for s in sets):
            return None
        for t, s in zip(types, sets, strict=True):
            by_type.setdefault(t, []).append(s[0])
    return chance_accuracy(by_type) if by_type else None


def _round4(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _selector_runs(model, rows, run, adapter, rate: float, dim: int):
    """The ground-truth selector's accuracy, packed and under the family's default positions
    (None, None where the dataset has no object centres)."""
    if GT_COLUMN not in rows[0]:
        return None, None

    def gt(_s, chunk):
        return PlanCompressor(
            rate=rate, dim=dim, plans=[selector_plan(r[GT_COLUMN], rate) for r in chunk]
        )

    # Packed, as the name says: the kept tokens take consecutive positions (the HF
    # convention, and the LLaVA families' default).
    selector = run(rows, gt, adapter_for(model, positions="packed"))["acc_avg"]
    # Under the family's own default too where it differs (Qwen: source positions), as the
    # compressors are evaluated.
    default_selector = selector if adapter.positions == "packed" else run(rows, gt)["acc_avg"]
    return selector, default_selector


def base_report(
    model,
    processor,
    dataset,
    *,
    rate: float = 0.9,
    history: str = "model",
    max_dialogues: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """How a base model uses the image, on the dialogues of ``dataset`` (the base report).

    The same batched conversations as :func:`evaluate`, under four conditions: all tokens,
    a blank image of the same size, equidistant ``sample`` at ``rate``, and (where the
    dataset has ``object_centres``) the ground-truth selector, packed.

    Returns:
        ``acc_avg``, ``acc_turn``, ``acc_avg_ci``, ``acc_blank_image``, ``acc_sample_r<rate>``,
        ``acc_selector_packed_r<rate>`` (None without ground truth), ``acc_selector_r<rate>``
        (the same selector under the family's default positions), ``positions``, ``chance`` (see
        :func:`chance`), ``n_dialogues``, ``visual_tokens`` (mean per dialogue, all tokens).
    """
    check_rate(rate, where="base report rate")
    rows = eval_rows(dataset, max_dialogues)
    dev = resolve_device(device)
    prepare_model(model, dev)
    adapter, dim = adapter_for(model), token_dim(model)
    n_runs = 3 + (GT_COLUMN in rows[0]) * (1 + (adapter.positions != "packed"))
    bar = progress_bar(total=len(rows) * n_runs, desc="base report", disable=not progress)
    common = {
        "history": history,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "dev": dev,
        "bar": bar,
        "ci_seed": seed,
        "teacher": {},
        "with_kl": False,
    }

    def run(rows_, comp_for, adapter_=adapter) -> dict[str, Any]:
        torch.manual_seed(seed)
        return run_method(model, processor, adapter_, rows_, comp_for, **common)

    full = run(rows, lambda _s, _c: None)
    blank = run([_blank_row(r) for r in rows], lambda _s, _c: None)
    sample = build("sample", rate=rate, dim=dim).to(dev).eval()
    sampled = run(rows, lambda _s, _c: sample)
    selector, default_selector = _selector_runs(model, rows, run, adapter, rate, dim)
    bar.close()
    r4 = _round4
    tokens = full["visual_tokens"]
    return {
        "acc_avg": r4(full["acc_avg"]),
        "acc_turn": [r4(a) for a in full["acc_turn"]],
        "acc_avg_ci": [r4(a) for a in full["acc_avg_ci"]],
        "acc_blank_image": r4(blank["acc_avg"]),
        "chance": r4(chance(rows)),
        f"acc_sample_r{rate:g}": r4(sampled["acc_avg"]),
        f"acc_selector_packed_r{rate:g}": r4(selector),
        f"acc_selector_r{rate:g}": r4(default_selector),
        "positions": adapter.positions,
        "n_dialogues": len(rows),
        "visual_tokens": int(tokens) if float(tokens).is_integer() else round(tokens, 2),
    }
