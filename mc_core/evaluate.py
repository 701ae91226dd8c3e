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
  prefill), one dialogue at a time;
- `visual_tokens`: mean visual tokens kept per dialogue; `prefill_tflops`: mean analytic LLM
  prefill TFLOPs of the turn-1 prompt (`mc_core.flops`).

The result follows DESIGN.md's metrics schema:
`{"arch", "rate", "dataset", "methods": {name: {"acc_turn", "acc_avg", "kl_to_full",
"prefill_ms", "visual_tokens", "prefill_tflops"}}}` (plus "history" and "dialogues").
`none` is the uncompressed reference.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mc_core.adapters import for_model
from mc_core.compressors import available, build
from mc_core.conversation import (
    BatchConversation,
    compress_inputs,
    model_device,
    reset_state,
    token_dim,
)
from mc_core.data.accuracy import exact_match, vqa_soft_accuracy
from mc_core.dialogue import encode_dialogue, render, to_device
from mc_core.flops import prefill_flops
from mc_core.losses import answer_kl
from mc_core.ops import check_rate
from mc_core.train import prepare_model, resolve_device

__all__ = ["evaluate", "score_answer", "score_turns", "token_maps", "write_report"]

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


def score_turns(
    preds: Sequence[Sequence[str]], answer_sets: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """Mean accuracy per turn.

    Args:
        preds: per dialogue, the predicted answer of each turn.
        answer_sets: per dialogue, per turn, the accepted answers.

    Returns:
        `[acc_turn_1, acc_turn_2, ...]`.
    """
    if len(preds) != len(answer_sets) or not preds:
        raise ValueError(f"{len(preds)} predicted dialogues vs {len(answer_sets)} references")
    turns = len(answer_sets[0])
    totals = [0.0] * turns
    for i, (p, sets) in enumerate(zip(preds, answer_sets, strict=True)):
        if len(p) != turns or len(sets) != turns:
            raise ValueError(
                f"dialogue {i}: {len(p)} answers for {len(sets)} turns (expected {turns})"
            )
        for k in range(turns):
            totals[k] += score_answer(p[k], sets[k])
    return [t / len(preds) for t in totals]


def _images(row: Mapping[str, Any]) -> list[Any]:
    image = row["image"]
    images = list(image) if isinstance(image, list | tuple) else [image]
    return [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images]


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
    model, processor, adapter, row, device
) -> tuple[dict[str, Any], Tensor, Tensor]:
    inputs, positions = encode_dialogue(processor, _images(row), row["questions"], row["answers"])
    inputs = to_device(inputs, device, next(model.parameters()).dtype)
    reset_state(adapter)
    logits = model(**inputs, logits_to_keep=positions.to(device)).logits[0]  # (T, V)
    return inputs, positions, logits.float()


@torch.no_grad()
def _student_logits(
    model, adapter, full_inputs, positions: Tensor, tokens: list[Tensor], P=None
) -> Tensor:
    inputs = adapter.inputs_with(full_inputs, tokens, P=P)
    shift = int(full_inputs["input_ids"].shape[1]) - int(inputs["input_ids"].shape[1])
    reset_state(adapter)
    keep = (positions - shift).to(model_device(model))
    return model(**inputs, logits_to_keep=keep).logits[0].float()  # (T, V)


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
) -> dict[str, Any]:
    """Evaluate `methods` at `rate` on the dialogues of `dataset`.

    Args:
        model: the LVLM (frozen by this call and moved to the device).
        processor: its processor.
        dataset: dialogue rows (`mc_core.data.schema`).
        methods: method names (`none` = all tokens; registry names; keys of `compressors`).
        rate: reduction rate in (0, 1).
        compressors: name -> compressor for methods that are not built from the registry
            (trained ones, e.g. metacompress).
        history: "model" (later turns see the model's answers) or "gold".
        max_dialogues: evaluate only the first N dialogues.
        device: "auto", "cpu" or "cuda".
        batch_size: dialogues per `BatchConversation`.
        max_new_tokens: answer length limit.
        arch, dataset_name: recorded in the report.
        seed: torch seed set before each method (random methods are reproducible).
        adapter: the family adapter (default `for_model(model)`).
        progress: tqdm bar.

    Returns:
        The metrics dict (module docstring).

    Raises:
        ValueError: bad rate, unknown method or history, a trainable method without a trained
            compressor, or an empty dataset.
    """
    check_rate(rate, where="evaluate rate")
    if history not in HISTORIES:
        raise ValueError(f"history={history!r}: expected one of {HISTORIES}")
    if not methods:
        raise ValueError("methods is empty: nothing to evaluate")
    n = len(dataset) if max_dialogues is None else min(len(dataset), int(max_dialogues))
    if n <= 0:
        raise ValueError(
            f"no dialogues to evaluate (dataset has {len(dataset)}, max_dialogues={max_dialogues})"
        )
    dev = resolve_device(device)
    prepare_model(model, dev)
    adapter = adapter if adapter is not None else for_model(model)
    comps = {m: _method_compressor(m, rate, token_dim(model), compressors, dev) for m in methods}
    rows = [dataset[i] for i in range(n)]
    turns = len(rows[0]["questions"])
    teacher: dict[int, tuple] = {}
    report: dict[str, Any] = {
        "arch": arch or type(model).__name__,
        "rate": float(rate),
        "dataset": dataset_name or "unknown",
        "history": history,
        "dialogues": n,
        "methods": {},
    }
    bar = tqdm(total=n * len(methods), desc=f"evaluate r={rate}", disable=not progress)
    for name in methods:
        comp = comps[name]
        torch.manual_seed(seed)
        preds: list[list[str]] = []
        kls, prefill, kept, flops = [], [], [], []
        for start in range(0, n, batch_size):
            chunk = rows[start : start + batch_size]
            conv = BatchConversation(
                model,
                processor,
                comp,
                images=[_images(r) for r in chunk],
                adapter=adapter,
                max_new_tokens=max_new_tokens,
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
                if comp is None:
                    kls.append(0.0)
                    continue
                if i not in teacher:
                    teacher[i] = _teacher_logits(model, processor, adapter, row, dev)
                full_inputs, positions, t_logits = teacher[i]
                s_logits = _student_logits(model, adapter, full_inputs, positions, c.tokens, c.P)
                kls.append(float(answer_kl(t_logits, s_logits)))
            bar.update(len(chunk))
        acc = score_turns(preds, [r["answer_sets"] for r in rows])
        report["methods"][name] = {
            "acc_turn": acc,
            "acc_avg": sum(acc) / len(acc),
            "kl_to_full": sum(kls) / len(kls),
            "prefill_ms": statistics.median(prefill),
            "visual_tokens": sum(kept) / len(kept),
            "prefill_tflops": sum(flops) / len(flops),
        }
    bar.close()
    return report


def write_report(metrics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `metrics` as JSON to `path` atomically (temp file in the same folder, rename).

    Raises:
        ValueError: a metric is NaN or infinite (JSON cannot hold it faithfully), or the
            `methods` section is missing.
    """
    if "methods" not in metrics:
        raise ValueError(f"metrics for {path} have no 'methods' section")
    for name, m in metrics["methods"].items():
        for key, value in m.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"metrics['methods'][{name!r}][{key!r}]={value!r} is not finite")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


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
    adapter = adapter if adapter is not None else for_model(model)
    device = model_device(model)
    out = []
    for i in indices:
        row = dataset[int(i)]
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
