"""Multi-turn evaluation of every compression method at one rate (one grid cell).

For each method, the dialogues run in padded batches through the inference engine
(`BatchConversation`): the visual tokens are compressed once (prompt-dependent methods such as
fastv rank them with the first turn's prompt and keep that choice), the KV cache is reused, and
each turn's greedy answer is scored (`mc_core.evaluation.scoring`). Later turns see the model's
own earlier answers (history "model", the default) or the gold ones ("gold").

Per method the report holds accuracy per turn and on average with its 95% bootstrap interval
over dialogues, each dialogue's accuracy (so methods pair up), accuracy per question type, the
KL to the full model on the answer tokens, where P puts its mass (`centre_mass`), the turn-1
prefill time, visual tokens kept and analytic prefill FLOPs. docs/contracts.md gives the
schema of every field; `none` is the uncompressed reference.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mc_core import io
from mc_core.compressors import available, build
from mc_core.compressors.ops import check_rate
from mc_core.data.images import as_rgb
from mc_core.evaluation.ceilings import GT_COLUMN, object_tokens
from mc_core.evaluation.scoring import by_type, dialogue_means, score_matrix, turn_means
from mc_core.evaluation.stats import bootstrap_ci
from mc_core.inference.dialogue import encode_dialogue, to_device
from mc_core.inference.engine import BatchConversation
from mc_core.inference.flops import prefill_flops
from mc_core.models.families import adapter_for
from mc_core.progress import progress as progress_bar
from mc_core.runtime import model_device, prepare_model, resolve_device, token_dim
from mc_core.training.losses import align_from_end, answer_kl

__all__ = [
    "HISTORIES",
    "centre_mass",
    "eval_rows",
    "evaluate",
    "method_compressor",
    "row_images",
    "run_method",
    "student_logits",
    "teacher_logits",
    "write_report",
]


HISTORIES = ("model", "gold")


def row_images(row: Mapping[str, Any]) -> list[Any]:
    # PIL images go through the project's one RGB conversion (alpha on white, 16-bit scaled).
    return as_rgb(row["image"])


def method_compressor(name: str, rate: float, dim: int, compressors, device):
    """The compressor of method ``name`` at ``rate``: a given one (built for ``rate``, or an
    any-rate one whose ``trained_rates`` span it: the runner then passes ``rate`` per call),
    else one built from the registry."""
    if compressors and name in compressors:
        comp = compressors[name]
        trained = getattr(comp, "trained_rates", None)
        any_rate = trained is not None and comp.serves(rate)
        if comp is not None and abs(float(comp.rate) - float(rate)) > 1e-9 and not any_rate:
            over = "" if trained is None else f" (trained over {list(trained)})"
            raise ValueError(
                f"compressors[{name!r}] was built for rate {comp.rate}{over}, "
                f"evaluating rate {rate}"
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
def teacher_logits(
    model, processor, adapter, row, device, instruction: str | None = None
) -> tuple[dict[str, Any], Tensor, Tensor]:
    inputs, positions = encode_dialogue(
        processor, row_images(row), row["questions"], row["answers"], instruction=instruction
    )
    inputs = to_device(inputs, device, next(model.parameters()).dtype)
    adapter.reset_state()
    logits = model(**inputs, logits_to_keep=positions.to(device)).logits[0]  # (T, V)
    return inputs, positions, logits.float()


@torch.no_grad()
def student_logits(
    model, adapter, full_inputs, positions: Tensor, tokens: list[Tensor], P=None
) -> Tensor:
    inputs = adapter.inputs_with(full_inputs, tokens, P=P)
    adapter.reset_state()
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


def run_method(
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
    rate: float | None = None,
) -> dict[str, Any]:
    """One method over ``rows``: its metrics dict (plus ``acc_avg_ci``).

    ``comp_for(start, chunk)`` gives the compressor of each batch (None: all tokens), so a
    ceiling can plan a P per dialogue; ``teacher`` caches the full model's gold logits by row.
    ``with_kl=False`` skips the two teacher-forced forwards of ``kl_to_full`` (then None).
    ``rate``: compress at it instead of each compressor's own rate (None: their own).
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
            images=[row_images(r) for r in chunk],
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            instruction=instruction,
            rates=rate,
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
                teacher[i] = teacher_logits(model, processor, adapter, row, dev, instruction)
            full_inputs, positions, t_logits = teacher[i]
            s_logits = student_logits(model, adapter, full_inputs, positions, c.tokens, c.P)
            kls.append(float(answer_kl(t_logits, s_logits)))
            centres.append(centre_mass(adapter, full_inputs, row.get(GT_COLUMN), c.P))
        if bar is not None:
            bar.update(len(chunk))
    scores = score_matrix(preds, [r["answer_sets"] for r in rows])  # each answer scored once
    acc = turn_means(scores)
    per_dialogue = dialogue_means(scores)
    return {
        "acc_turn": acc,
        "acc_avg": sum(acc) / len(acc),
        "acc_avg_ci": bootstrap_ci(per_dialogue, seed=ci_seed),
        # Dataset order: two methods' lists pair up dialogue by dialogue (stats.paired_difference).
        "acc_dialogues": [round(v, 6) for v in per_dialogue],
        "acc_by_type": by_type(scores, rows),
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


def eval_rows(dataset, max_dialogues: int | None) -> list[dict[str, Any]]:
    n = len(dataset) if max_dialogues is None else min(len(dataset), int(max_dialogues))
    if n <= 0:
        raise ValueError(
            f"no dialogues to evaluate (dataset has {len(dataset)}, max_dialogues={max_dialogues})"
        )
    from mc_core.data.schema import row

    return [row(dataset, i) for i in range(n)]


def _report_header(arch: str, rate: float, dataset: str | None, history: str, n: int) -> dict:
    """The cell's report before any method: what was evaluated, on how many dialogues."""
    return {
        "arch": arch,
        "rate": float(rate),
        "dataset": dataset or "unknown",
        "history": history,
        "dialogues": n,
        "n_dialogues": n,
        "methods": {},
    }


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
        model, processor: the LVLM (frozen by this call and moved to the device) and its
            processor.
        dataset: dialogue rows (`mc_core.data.schema`).
        methods: method names (`none` = all tokens; registry names; keys of `compressors`).
        rate: reduction rate in (0, 1).
        compressors: name -> compressor for methods that are not built from the registry
            (trained ones, e.g. metacompress; or any extra name such as a registry champion).
        history: "model" (later turns see the model's answers) or "gold".
        max_dialogues: evaluate only the first N dialogues.
        device: "auto", "cpu" or "cuda"; batch_size: dialogues per `BatchConversation`.
        max_new_tokens: answer length limit; arch, dataset_name: recorded in the report.
        seed: torch seed set before each method (random methods are reproducible); also the
            bootstrap seed of the intervals.
        adapter: the family adapter (default `adapter_for(model)`); progress: a progress bar.
        instruction: appended to every question, in the prompts and in the full model's KL
            targets (None: `mc_core.inference.dialogue.default_instruction`).

    Returns:
        The metrics dict (docs/contracts.md), with `n_dialogues` and per method `acc_avg_ci`.

    Raises:
        ValueError: bad rate, unknown method or history, a trainable method without a trained
            compressor, or an empty dataset.
    """
    check_rate(rate, where="evaluate rate")
    if history not in HISTORIES:
        raise ValueError(f"history={history!r}: expected one of {HISTORIES}")
    if not methods:
        raise ValueError("methods is empty: nothing to evaluate")
    rows = eval_rows(dataset, max_dialogues)
    n, dev = len(rows), resolve_device(device)
    prepare_model(model, dev)
    adapter = adapter if adapter is not None else adapter_for(model)
    comps = {m: method_compressor(m, rate, token_dim(model), compressors, dev) for m in methods}
    teacher: dict[int, tuple] = {}
    report = _report_header(arch or type(model).__name__, rate, dataset_name, history, n)
    bar = progress_bar(total=n * len(methods), desc=f"evaluate r={rate}", disable=not progress)
    for name in methods:
        torch.manual_seed(seed)
        report["methods"][name] = run_method(
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
            rate=_call_rate(comps[name], rate),
        )
    bar.close()
    return report


def _call_rate(comp, rate: float) -> float | None:
    """The rate to pass per call: only an any-rate compressor away from its own rate gets one
    (every other compressor is built for ``rate``: `method_compressor`)."""
    return None if comp is None or abs(float(comp.rate) - float(rate)) <= 1e-9 else rate


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
