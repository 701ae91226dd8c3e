"""How much the question steers FastV's choice of tokens at LLM layer K.

FastV keeps the visual tokens the first prompt's last token attends to most at layer K. It can
only beat prompt-agnostic methods on turn 1 (and lose on later turns) if that ranking depends
on the question. `question_overlap` measures this without any annotation: for each dialogue,
each of its questions is put to the model as if it were the first turn, FastV's kept set is
taken for each, and the overlap of turn t's set with turn 1's (``|S_1 & S_t| / m``, t >= 2) is
averaged. 1.0 means layer K picks the same tokens whatever is asked (FastV then acts as a
prompt-agnostic selector); ``m / n``, the expected overlap of two random sets, means the choice
is entirely the question's.

Where the data gives object centres (`mc_core.evaluation.ceilings.GT_COLUMN`), `centre_recall` adds
what
the choice is about: the share of the objects' centre tokens that turn 1's kept set holds
(``m / n`` again for a random set). A question-driven layer that keeps few centres looks at
something other than the objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mc_core.compressors import build
from mc_core.data.images import as_rgb
from mc_core.evaluation.ceilings import GT_COLUMN, object_tokens
from mc_core.evaluation.stats import bootstrap_ci
from mc_core.inference.dialogue import render, to_device
from mc_core.models.adapters import prompt_attention
from mc_core.models.families import adapter_for
from mc_core.runtime import model_device, token_dim


@torch.no_grad()
def question_overlap(
    model,
    processor,
    dataset,
    rate: float,
    layers: Sequence[int],
    *,
    max_dialogues: int | None = None,
    adapter=None,
    seed: int = 0,
) -> dict[int, dict[str, Any]]:
    """FastV's kept-set overlap across a dialogue's questions, per layer K.

    Args:
        model, processor: the LVLM (frozen) and its processor.
        dataset: dialogues in the `mc_core.data.schema` layout; those with one question are
            skipped (nothing to compare).
        rate: fraction of visual tokens FastV removes.
        layers: LLM layers K to probe (each within the LLM's depth).
        max_dialogues: the first N dialogues (None: all).
        adapter: the family adapter (default: `adapter_for(model)`).
        seed: bootstrap seed of the intervals.

    Returns:
        ``{K: {"overlap", "overlap_ci", "chance", "dialogues", "centre_recall"}}``: the mean
        overlap (pooled over a dialogue's images and later turns, then averaged over
        dialogues), its 95% bootstrap interval over dialogues, the random-set expectation
        ``m / n``, the dialogues used, and turn 1's mean centre recall over the single-image
        dialogues that have object centres (None when none has).

    Raises:
        ValueError: no dialogue has two questions.
    """
    from mc_core.data import schema

    adapter = adapter if adapter is not None else adapter_for(model)
    # FastV itself picks the kept sets from the scores, so the probe follows its selection.
    fastv = build("fastv", rate=rate, dim=token_dim(model))
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    n_rows = len(dataset) if max_dialogues is None else min(max_dialogues, len(dataset))
    per_layer: dict[int, list[float]] = {k: [] for k in layers}
    recall: dict[int, list[float]] = {k: [] for k in layers}
    chance: list[float] = []
    for i in range(n_rows):
        row = schema.row(dataset, i)
        questions = row["questions"]
        if len(questions) < 2:
            continue
        images = as_rgb(row["image"])
        inputs = _openings(processor, questions, images, device, dtype)
        adapter.reset_state()
        tokens = adapter.visual_tokens(inputs)  # len(questions) * len(images), batch-major
        contexts = adapter.contexts(inputs)
        sizes = [t.shape[0] for t in tokens[: len(images)]]
        kept = [fastv.kept(n) for n in sizes]
        chance.append(sum(kept) / sum(sizes))
        pos = contexts[0].positions
        centres = None
        if row.get(GT_COLUMN) is not None and len(images) == 1 and pos is not None:
            centres = set(object_tokens(row[GT_COLUMN], pos).tolist())
        for k in layers:
            sets = _kept_sets(model, adapter, fastv, inputs, tokens, contexts, k)
            per_layer[k].append(_later_overlap(sets, kept, len(questions), len(images)))
            if centres:
                recall[k].append(len(sets[0] & centres) / len(centres))
    if not chance:
        raise ValueError(
            f"question_overlap: none of the first {n_rows} dialogues has two questions"
        )
    return _summary(per_layer, recall, chance, seed)


def _openings(processor, questions: Sequence[str], images: list, device, dtype) -> dict:
    """Every question as the opening turn, in one padded batch (same images each)."""
    texts = [render(processor, [q], [], n_images=len(images)) for q in questions]
    inputs = dict(
        processor(text=texts, images=images * len(texts), return_tensors="pt", padding=True)
    )
    return to_device(inputs, device, dtype)


def _kept_sets(model, adapter, fastv, inputs: dict, tokens, contexts, layer: int) -> list[set]:
    """FastV's kept token indices of every (prompt, image), batch-major, ranked by the
    prompt's attention at LLM layer ``layer``."""
    scores = prompt_attention(model, adapter, inputs, layer=layer, visual_tokens=tokens)
    for ctx, s in zip(contexts, scores, strict=True):
        ctx.prompt_attention = s
    _, ps = fastv([t.float() for t in tokens], contexts)
    return [set(P.argmax(1).tolist()) for P in ps]  # one-hot rows: the kept indices


def _later_overlap(sets: list[set], kept: list[int], n_texts: int, n_images: int) -> float:
    """``|S_1 & S_t| / m`` pooled over the later prompts t and the images: the first
    ``n_images`` sets are turn 1's."""
    first = sets[:n_images]
    shared = total = 0
    for t in range(1, n_texts):
        for j, s1 in enumerate(first):
            shared += len(s1 & sets[t * n_images + j])
            total += kept[j]
    return shared / total


def _summary(
    per_layer: dict[int, list[float]],
    recall: dict[int, list[float]],
    chance: list[float],
    seed: int,
) -> dict[int, dict[str, Any]]:
    """Per layer: mean overlap with its bootstrap interval, chance, dialogues, centre recall."""
    return {
        k: {
            "overlap": sum(v) / len(v),
            "overlap_ci": bootstrap_ci(v, seed=seed),
            "chance": sum(chance) / len(chance),
            "dialogues": len(v),
            "centre_recall": sum(recall[k]) / len(recall[k]) if recall[k] else None,
        }
        for k, v in per_layer.items()
    }
