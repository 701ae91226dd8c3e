"""Multi-turn evaluation of every compression method at one rate (one grid cell).

For each method, each dialogue is run as a `Conversation`: the visual tokens are compressed once
(prompt-dependent methods such as fastv rank them with the first turn's prompt and keep that
choice), the KV cache is reused, and each turn's greedy answer is scored:

- accuracy: exact match after VQA normalisation, or VQA soft accuracy where a turn has several
  human answers (VQAv2's ten), `mc_core.data.accuracy`;
- history: later turns see the model's own earlier answers (default) or the gold ones;
- `kl_to_full`: KL(p_full || p_method) over the answer tokens of the gold dialogue, teacher
  forced, with the very tokens the conversation used (mean over dialogues);
- `prefill_ms`: median over dialogues of the turn-1 prefill (vision tower, compression, LLM
  prefill), amortised: dialogues run in padded batches of `batch_size` (`BatchConversation`),
  and each gets its batch's prefill time divided by the batch size;
- `visual_tokens`: mean visual tokens kept per dialogue; `prefill_tflops`: mean analytic LLM
  prefill TFLOPs of the turn-1 prompt (`mc_core.inference.flops`);
- `acc_avg_ci`: the 95% percentile-bootstrap interval `[lo, hi]` of `acc_avg`, resampling
  dialogues (their turns share an image; `mc_core.evaluation.stats`, seeded by `seed`);
- `acc_dialogues`: each dialogue's accuracy over its turns, in dataset order, so two methods
  compare dialogue by dialogue (`mc_core.evaluation.stats.paired_difference`);
- `acc_by_type`: `{question type: {"acc", "n"}}` over all turns, by the dataset's own
  `question_types` (None without them), so a gap shows where it comes from;
- `centre_mass`: where the data has object centres (`object_centres`, one image), how much of
  P reaches the token nearest each object's centre: the mean over objects of
  `min(1, sum_i P_ij)` at that token (1 = every object's centre token kept whole; a selector
  scores the share of centres it keeps). Which tokens a method keeps, as one number; None
  without object centres, for `none` and without `kl_to_full`.

The result follows the metrics schema of docs/contracts.md:
`{"arch", "rate", "dataset", "n_dialogues", "methods": {name: {"acc_turn", "acc_avg",
"acc_avg_ci", "acc_dialogues", "acc_by_type", "kl_to_full", "centre_mass", "prefill_ms",
"visual_tokens", "prefill_tflops"}}}` (plus "history"
and "dialogues", = n_dialogues). `none` is the uncompressed reference.

`evaluate_ceilings` measures the cell's ceilings (`mc_core.evaluation.ceilings`) with the same loop:
`{"selector": <method metrics> | {"available": false, "note"}, "oracle": <method metrics> +
{"dialogues", "indices", "steps", "lr", "eps", "fit_kl", "none_acc_avg", "none_acc_avg_ci"},
"cls_overlap": {"share", "chance", "dialogues"} | {"available": false, "note"}}`.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mc_core import io
from mc_core.compressors import available, build
from mc_core.compressors.ops import check_rate
from mc_core.data.accuracy import exact_match, vqa_soft_accuracy
from mc_core.data.images import as_rgb
from mc_core.evaluation.ceilings import (
    GT_COLUMN,
    PlanCompressor,
    cls_overlap,
    fixed_plan,
    object_tokens,
    oracle_matrix,
    selector_plan,
)
from mc_core.evaluation.stats import bootstrap_ci
from mc_core.inference.conversation import (
    BatchConversation,
    compress_inputs,
    model_device,
    reset_state,
    token_dim,
)
from mc_core.inference.dialogue import encode_dialogue, render, to_device
from mc_core.inference.flops import prefill_flops
from mc_core.models.families import adapter_for
from mc_core.progress import progress as progress_bar
from mc_core.training.loop import prepare_model, resolve_device
from mc_core.training.losses import align_from_end, answer_kl

__all__ = [
    "base_report",
    "chance",
    "evaluate",
    "evaluate_ceilings",
    "score_answer",
    "score_by_type",
    "score_dialogues",
    "score_matrix",
    "score_turns",
    "token_maps",
    "write_report",
]

HISTORIES = ("model", "gold")


def score_answer(pred: str, answer_set: Sequence[str]) -> float:
    """Accuracy of one predicted answer: VQA soft accuracy against several human answers,
    exact match (normalised) against a single one."""
    answer_set = list(answer_set)
    if not answer_set:
        raise ValueError(f"no reference answer to score {pred!r} against")
    if len(answer_set) >= 2:
        return vqa_soft_accuracy(pred, answer_set)
    return exact_match(pred, answer_set[0])


def score_matrix(
    preds: Sequence[Sequence[str]], answer_sets: Sequence[Sequence[Sequence[str]]]
) -> list[list[float]]:
    """Each answer's accuracy, per dialogue and turn: what every summary below averages.

    Args:
        preds: per dialogue, the predicted answer of each turn.
        answer_sets: per dialogue, per turn, the accepted answers.
    """
    if len(preds) != len(answer_sets) or not preds:
        raise ValueError(f"{len(preds)} predicted dialogues vs {len(answer_sets)} references")
    scores = []
    for i, (p, sets) in enumerate(zip(preds, answer_sets, strict=True)):
        if len(p) != len(sets):
            raise ValueError(f"dialogue {i}: {len(p)} answers for {len(sets)} turns")
        scores.append([score_answer(a, s) for a, s in zip(p, sets, strict=True)])
    return scores


def score_turns(
    preds: Sequence[Sequence[str]], answer_sets: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """Mean accuracy per turn, `[acc_turn_1, acc_turn_2, ...]` (arguments as `score_matrix`)."""
    return _turn_means(score_matrix(preds, answer_sets))


def _turn_means(scores: list[list[float]]) -> list[float]:
    turns = len(scores[0])
    for i, row in enumerate(scores):
        if len(row) != turns:
            raise ValueError(f"dialogue {i}: {len(row)} turns (expected {turns})")
    return [sum(col) / len(scores) for col in zip(*scores, strict=True)]


def _dialogue_means(scores: list[list[float]]) -> list[float]:
    return [sum(row) / len(row) for row in scores]


def score_by_type(
    preds: Sequence[Sequence[str]], rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float | int]] | None:
    """Accuracy per question type over every turn: ``{type: {"acc", "n"}}``, types sorted.

    The types are the dataset's own labels (``question_types``: GQA's structural types, VQAv2's
    answer types), so where a method loses shows without knowing the dataset. Turn-weighted:
    ``sum(acc * n) / sum(n)`` is the mean over all turns, ``acc_avg`` when every dialogue has
    the same number of turns. None where a row has no type per turn.
    """
    return _by_type(score_matrix(preds, [r["answer_sets"] for r in rows]), rows)


def _by_type(
    scores: list[list[float]], rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float | int]] | None:
    hits: dict[str, list[float]] = {}
    for row_scores, row in zip(scores, rows, strict=True):
        types = row.get("question_types") or []
        if len(types) != len(row_scores):
            return None
        for t, v in zip(types, row_scores, strict=True):
            hits.setdefault(str(t), []).append(v)
    return {t: {"acc": sum(v) / len(v), "n": len(v)} for t, v in sorted(hits.items())} or None


def _images(row: Mapping[str, Any]) -> list[Any]:
    # PIL images go through the project's one RGB conversion (alpha on white, 16-bit scaled).
    return as_rgb(row["image"])


def _method_compressor(name: str, rate: float, dim: int, compressors, device):
    if compressors and name in compressors:
        comp = compressors[name]
        if comp is not None and abs(float(comp.rate) - float(rate)) > 1e-9:
            raise ValueError(
                f"compressors[{name!r}] was built for rate {comp.rate}, evaluating rate {rate}"
            )
        return comp.to(device).eval() if comp is not None else None
    if name == "none":
        return None
    if name not in available():
        raise ValueError(f"method {name!r} is not registered; available: {', '.join(available())}")
    comp = build(name, rate=rate, dim=dim)
    if comp.trainable:
        raise ValueError(
            f"method {name!r} must be trained: pass compressors={{{name!r}: <trained compressor>}}"
        )
    return comp.to(device).eval()


@torch.no_grad()
def _teacher_logits(
    model, processor, adapter, row, device, instruction: str | None = None
) -> tuple[dict[str, Any], Tensor, Tensor]:
    inputs, positions = encode_dialogue(
        processor, _images(row), row["questions"], row["answers"], instruction=instruction
    )
    inputs = to_device(inputs, device, next(model.parameters()).dtype)
    reset_state(adapter)
    logits = model(**inputs, logits_to_keep=positions.to(device)).logits[0]  # (T, V)
    return inputs, positions, logits.float()


@torch.no_grad()
def _student_logits(
    model, adapter, full_inputs, positions: Tensor, tokens: list[Tensor], P=None
) -> Tensor:
    inputs = adapter.inputs_with(full_inputs, tokens, P=P)
    reset_state(adapter)
    keep = align_from_end(
        positions, full_inputs["input_ids"].shape[1], inputs["input_ids"].shape[1]
    ).to(model_device(model))
    return model(**inputs, logits_to_keep=keep).logits[0].float()  # (T, V)


def centre_mass(adapter, full_inputs, centres, P: list[Tensor] | None) -> float | None:
    """Mean over objects of ``min(1, sum_i P_ij)`` at the token nearest each object centre.

    ``centres`` are the row's ``object_centres`` ((row, col) in [0, 1]); ``full_inputs`` the
    model inputs holding its one image (they give the tokens' positions). None where it is not
    measurable: no centres, no P (uncompressed), or not exactly one image with positions.
    Where one image gives several views (LLaVA-NeXT's base view and crops), only the single
    nearest token of any view counts, so the number is a lower bound there.
    """
    if not centres or P is None or len(P) != 1:
        return None
    ctx = adapter.contexts(full_inputs)
    if len(ctx) != 1 or ctx[0].positions is None:
        return None
    mass = P[0].detach().float().sum(dim=0).cpu()  # (n,) what each source token gives
    return float(mass[object_tokens(centres, ctx[0].positions)].clamp(max=1.0).mean())


def score_dialogues(
    preds: Sequence[Sequence[str]], answer_sets: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """Each dialogue's accuracy averaged over its turns (the unit the intervals resample)."""
    return _dialogue_means(score_matrix(preds, answer_sets))


def _run_method(
    model,
    processor,
    adapter,
    rows,
    comp_for,
    *,
    history,
    batch_size,
    max_new_tokens,
    teacher,
    dev,
    bar,
    ci_seed,
    with_kl: bool = True,
    instruction: str | None = None,
) -> dict[str, Any]:
    """One method over ``rows``: its metrics dict (plus ``acc_avg_ci``).

    ``comp_for(start, chunk)`` gives the compressor of each batch (None: all tokens), so a
    ceiling can plan a P per dialogue; ``teacher`` caches the full model's gold logits by row.
    ``with_kl=False`` skips the two teacher-forced forwards of ``kl_to_full`` (then None).
    """
    turns = len(rows[0]["questions"])
    preds: list[list[str]] = []
    kls, prefill, kept, flops, centres = [], [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        comp = comp_for(start, chunk)
        conv = BatchConversation(
            model,
            processor,
            comp,
            images=[_images(r) for r in chunk],
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            instruction=instruction,
        )
        answers = []
        for k in range(turns):
            answers.append(conv.ask([r["questions"][k] for r in chunk]))
            if history == "gold":
                conv.set_answers([r["answers"][k] for r in chunk])
        for j, (row, c) in enumerate(zip(chunk, conv.rows, strict=True)):
            i = start + j
            preds.append([a[j] for a in answers])
            prefill.append(c.prefill_s[0] * 1e3)
            kept.append(sum(c.visual_tokens))
            flops.append(prefill_flops(model.config, c.cache_tokens[0]) / 1e12)
            if comp is None or not with_kl:
                kls.append(0.0)
                continue
            if i not in teacher:
                teacher[i] = _teacher_logits(model, processor, adapter, row, dev, instruction)
            full_inputs, positions, t_logits = teacher[i]
            s_logits = _student_logits(model, adapter, full_inputs, positions, c.tokens, c.P)
            kls.append(float(answer_kl(t_logits, s_logits)))
            centres.append(centre_mass(adapter, full_inputs, row.get(GT_COLUMN), c.P))
        if bar is not None:
            bar.update(len(chunk))
    scores = score_matrix(preds, [r["answer_sets"] for r in rows])  # each answer scored once
    acc = _turn_means(scores)
    per_dialogue = _dialogue_means(scores)
    return {
        "acc_turn": acc,
        "acc_avg": sum(acc) / len(acc),
        "acc_avg_ci": bootstrap_ci(per_dialogue, seed=ci_seed),
        # Dataset order: two methods' lists pair up dialogue by dialogue (stats.paired_difference).
        "acc_dialogues": [round(v, 6) for v in per_dialogue],
        "acc_by_type": _by_type(scores, rows),
        "kl_to_full": sum(kls) / len(kls) if with_kl else None,
        "centre_mass": _mean_or_none(centres),
        "prefill_ms": statistics.median(prefill),
        "visual_tokens": sum(kept) / len(kept),
        "prefill_tflops": sum(flops) / len(flops),
    }


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the measured values; None when there are none (the metric does not apply)."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def _rows(dataset, max_dialogues: int | None) -> list[dict[str, Any]]:
    n = len(dataset) if max_dialogues is None else min(len(dataset), int(max_dialogues))
    if n <= 0:
        raise ValueError(
            f"no dialogues to evaluate (dataset has {len(dataset)}, max_dialogues={max_dialogues})"
        )
    from mc_core.data.schema import row

    return [row(dataset, i) for i in range(n)]


def evaluate(
    model,
    processor,
    dataset,
    methods: Sequence[str],
    rate: float,
    *,
    compressors: Mapping[str, Any] | None = None,
    history: str = "model",
    max_dialogues: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int = 4,
    arch: str | None = None,
    dataset_name: str | None = None,
    seed: int = 0,
    adapter=None,
    progress: bool = True,
    instruction: str | None = None,
) -> dict[str, Any]:
    """Evaluate `methods` at `rate` on the dialogues of `dataset`.

    Args:
        model: the LVLM (frozen by this call and moved to the device).
        processor: its processor.
        dataset: dialogue rows (`mc_core.data.schema`).
        methods: method names (`none` = all tokens; registry names; keys of `compressors`).
        rate: reduction rate in (0, 1).
        compressors: name -> compressor for methods that are not built from the registry
            (trained ones, e.g. metacompress; or any extra name such as a registry champion).
        history: "model" (later turns see the model's answers) or "gold".
        max_dialogues: evaluate only the first N dialogues.
        device: "auto", "cpu" or "cuda".
        batch_size: dialogues per `BatchConversation`.
        max_new_tokens: answer length limit.
        arch, dataset_name: recorded in the report.
        seed: torch seed set before each method (random methods are reproducible); also the
            bootstrap seed of the intervals.
        adapter: the family adapter (default `adapter_for(model)`).
        progress: progress bar (a tqdm bar on a terminal, log lines elsewhere).
        instruction: appended to every question, in the prompts and in the full model's KL
            targets (None: `mc_core.inference.dialogue.default_instruction`: LLaVA's short-answer
            instruction for real tokenizers, none for the synthetic world).

    Returns:
        The metrics dict (module docstring), with `n_dialogues` and per method `acc_avg_ci`.

    Raises:
        ValueError: bad rate, unknown method or history, a trainable method without a trained
            compressor, or an empty dataset.
    """
    check_rate(rate, where="evaluate rate")
    if history not in HISTORIES:
        raise ValueError(f"history={history!r}: expected one of {HISTORIES}")
    if not methods:
        raise ValueError("methods is empty: nothing to evaluate")
    rows = _rows(dataset, max_dialogues)
    n = len(rows)
    dev = resolve_device(device)
    prepare_model(model, dev)
    adapter = adapter if adapter is not None else adapter_for(model)
    comps = {m: _method_compressor(m, rate, token_dim(model), compressors, dev) for m in methods}
    teacher: dict[int, tuple] = {}
    report: dict[str, Any] = {
        "arch": arch or type(model).__name__,
        "rate": float(rate),
        "dataset": dataset_name or "unknown",
        "history": history,
        "dialogues": n,
        "n_dialogues": n,
        "methods": {},
    }
    bar = progress_bar(total=n * len(methods), desc=f"evaluate r={rate}", disable=not progress)
    for name in methods:
        torch.manual_seed(seed)
        report["methods"][name] = _run_method(
            model,
            processor,
            adapter,
            rows,
            lambda _s, _c, comp=comps[name]: comp,
            history=history,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            teacher=teacher,
            dev=dev,
            bar=bar,
            ci_seed=seed,
            instruction=instruction,
        )
    bar.close()
    return report


def _blank_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with every image replaced by a uniform grey one of the same size."""

    grey = [Image.new("RGB", im.size, (128, 128, 128)) for im in _images(row)]
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
    rows = _rows(dataset, max_dialogues)
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
        return _run_method(model, processor, adapter_, rows_, comp_for, **common)

    full = run(rows, lambda _s, _c: None)
    blank = run([_blank_row(r) for r in rows], lambda _s, _c: None)
    sample = build("sample", rate=rate, dim=dim).to(dev).eval()
    sampled = run(rows, lambda _s, _c: sample)
    selector = default_selector = None
    if GT_COLUMN in rows[0]:

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
    `object_centres` column, else it is `{"available": False, "note": ...}`. The oracle runs
    on a seeded subsample of `oracle_dialogues` dialogues (`none` is scored on the same
    subsample as its reference); `cls_overlap` is measured on the oracle's P.
    """
    check_rate(rate, where="ceilings rate")
    rows = _rows(dataset, max_dialogues)
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
        out["selector"] = _run_method(
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
    k = min(int(oracle_dialogues), len(rows))
    pick = sorted(
        torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    )
    sub = [rows[i] for i in pick]
    teacher = {j: _teacher_logits(model, processor, adapter, r, dev) for j, r in enumerate(sub)}
    plans, kls, overlaps, chance = _fit_oracles(
        model, adapter, teacher, rate, steps=oracle_steps, lr=oracle_lr, eps=oracle_eps, seed=seed
    )
    # Batches must replay plans in row order: one queue over the subsample.
    queue = PlanCompressor(rate=rate, dim=dim, plans=plans)
    oracle = _run_method(
        model, processor, adapter, sub, lambda _s, _c: queue, teacher=teacher, **common
    )
    ref = _run_method(
        model, processor, adapter, sub, lambda _s, _c: None, teacher=teacher, **common
    )
    oracle.update(
        {
            "dialogues": k,
            "indices": pick,
            "steps": int(oracle_steps),
            "lr": float(oracle_lr),
            "eps": float(oracle_eps),
            "fit_kl": sum(kls) / max(len(kls), 1),
            "none_acc_avg": ref["acc_avg"],
            "none_acc_avg_ci": ref["acc_avg_ci"],
        }
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


def _non_finite(obj: Any, where: str) -> str | None:
    """The first NaN / infinite number in a nested report, as its key path."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    items = (
        obj.items()
        if isinstance(obj, Mapping)
        else (enumerate(obj) if isinstance(obj, list) else ())
    )
    for k, v in items:
        bad = _non_finite(v, f"{where}[{k!r}]")
        if bad:
            return bad
    return None


def write_report(metrics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `metrics` as JSON to `path` atomically (`mc_core.io`).

    Raises:
        ValueError: a number anywhere is NaN or infinite (JSON cannot hold it faithfully), or
            the `methods` section is missing.
    """
    if "methods" not in metrics:
        raise ValueError(f"metrics for {path} have no 'methods' section")
    bad = _non_finite(dict(metrics), "metrics")
    if bad:
        raise ValueError(f"{bad} is not finite (writing {path})")
    return io.write_json(path, dict(metrics))


@torch.no_grad()
def token_maps(
    model,
    processor,
    dataset,
    compressors: Mapping[str, Any],
    *,
    indices: Sequence[int] = (0, 1, 2),
    adapter=None,
) -> list[dict[str, Any]]:
    """Where each compressor draws its tokens from, per image (for plots).

    For each dialogue in `indices`, each compressor compresses the first image with the first
    turn's prompt (what a conversation does) and the column mass of its P (`P.sum(0)`, [n]:
    how much of each visual token ends up in the kept ones) is returned with the tokens'
    layout.

    Returns:
        One dict per dialogue: `image` (PIL), `dialogue_id`, `question` (turn 1),
        `positions` ([n, 2] (row, col) in [0, 1] or None), `grid` ((h, w) or None),
        `mass` {name: Tensor [n]}.
    """
    adapter = adapter if adapter is not None else adapter_for(model)
    device = model_device(model)
    from mc_core.data import schema

    out = []
    for i in indices:
        row = schema.row(dataset, i)
        images = _images(row)
        text = render(processor, row["questions"][:1], [], n_images=len(images))
        inputs = dict(processor(text=[text], images=images, return_tensors="pt"))
        inputs = to_device(inputs, device, next(model.parameters()).dtype)
        ctx = adapter.contexts(inputs)[0]
        entry = {
            "image": images[0],
            "dialogue_id": row.get("dialogue_id", str(i)),
            "question": row["questions"][0],
            "positions": None if ctx.positions is None else ctx.positions.detach().cpu(),
            "grid": ctx.grid,
            "mass": {},
        }
        for name, comp in compressors.items():
            reset_state(adapter)
            _, _, ps = compress_inputs(model, adapter, comp.to(device).eval(), inputs)
            entry["mass"][name] = ps[0].sum(0).detach().float().cpu()
        out.append(entry)
    return out
