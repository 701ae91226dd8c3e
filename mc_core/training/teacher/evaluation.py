"""Held-out accuracy of a teacher, through the same path every compressor takes.

Each dialogue is encoded once (``mc_core.inference.dialogue``), every turn answered after the
previous
gold turns (teacher forcing, one forward); the answer is the argmax token at its position.
Reduced conditions feed their tokens through the adapter's ``inputs_with`` with P, as the
evaluation of compressors does.
"""

from __future__ import annotations

import numpy as np
import torch

from mc_core import compressors
from mc_core.compressors.ops import kept_tokens, selection_matrix
from mc_core.data import synthetic as S
from mc_core.models import families
from mc_core.training.teacher.encoding import encode
from mc_core.training.teacher.layout import layout_for, render_example, selector_index

__all__ = ["evaluate"]

_CONDITIONS = ("full", "blank", "sample", "selector")


def _answers(model, adapter, inputs: dict, positions: list[int]) -> list[int]:
    adapter.reset_state()
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    return [int(logits[p].argmax()) for p in positions]


def _reduced(model, adapter, enc, y: torch.Tensor, p: torch.Tensor) -> list[int]:
    n = p.shape[1]
    inputs = adapter.inputs_with(enc.inputs, [y], P=[p])
    return _answers(model, adapter, inputs, [a + y.shape[0] - n for a in enc.answer_pos])


def evaluate(
    model,
    processor,
    world: S.WorldConfig,
    *,
    n_dialogues: int = 300,
    seed: int = 10_000,
    rate: float = 0.9,
    progress: bool = False,
) -> dict:
    """Held-out accuracies of a base model on the synthetic world.

    Returns:
        ``acc_turn`` (per turn), ``acc_avg``, ``acc_blank_image`` (a uniform grey image),
        ``chance`` (majority answer per question type), ``acc_sample_r<rate>`` (equidistant
        sampling), ``acc_selector_packed_r<rate>`` (the ground-truth object-centre tokens,
        filled up to m, packed by the adapter), ``acc_by_type``, ``n_dialogues``,
        ``visual_tokens``.
    """
    from mc_core.progress import progress as progress_bar

    adapter = families.adapter_for(model)
    layout = layout_for(model, world, processor)
    sample = compressors.build("sample", rate=rate, dim=adapter.dim)
    blank = S.blank_image(world)
    hits = {c: np.zeros(3) for c in _CONDITIONS}
    by_type: dict[str, list[int]] = {}
    answers_by_type: dict[str, list[str]] = {}
    model.eval()
    n_visual = 0
    for i in progress_bar(range(n_dialogues), desc="evaluate", disable=not progress):
        ex = render_example(seed, i, world, layout)
        d = S.make_dialogue(ex.scene, S.scene_rng(seed, i, 1), world)  # = S.example(seed, i)
        enc = encode(processor, ex.image, d, adapter.image_token_id)
        with torch.no_grad():
            tokens = adapter.visual_tokens(enc.inputs)[0]
            y, p = sample(tokens, adapter.contexts(enc.inputs)[0])
        n_visual = tokens.shape[0]
        idx = torch.from_numpy(selector_index(ex.labels, kept_tokens(n_visual, rate)))
        preds = {
            "full": _answers(model, adapter, enc.inputs, enc.answer_pos),
            "blank": _answers(
                model,
                adapter,
                encode(processor, blank, d, adapter.image_token_id).inputs,
                enc.answer_pos,
            ),
            "sample": _reduced(model, adapter, enc, y, p),
            "selector": _reduced(model, adapter, enc, tokens[idx], selection_matrix(idx, n_visual)),
        }
        for c, pred in preds.items():
            ok = np.array(pred) == np.array(enc.answer_ids)
            hits[c] += ok
            if c == "full":
                for t, o in zip(d.question_types, ok, strict=True):
                    by_type.setdefault(t, []).append(int(o))
        for t, a in zip(d.question_types, d.answers, strict=True):
            answers_by_type.setdefault(t, []).append(a)
    acc = {c: h / n_dialogues for c, h in hits.items()}
    return {
        "acc_turn": [round(float(a), 4) for a in acc["full"]],
        "acc_avg": round(float(acc["full"].mean()), 4),
        "acc_blank_image": round(float(acc["blank"].mean()), 4),
        "chance": round(S.chance_accuracy(answers_by_type), 4),
        f"acc_sample_r{rate:g}": round(float(acc["sample"].mean()), 4),
        f"acc_selector_packed_r{rate:g}": round(float(acc["selector"].mean()), 4),
        "acc_by_type": {t: round(float(np.mean(v)), 4) for t, v in sorted(by_type.items())},
        "n_dialogues": n_dialogues,
        "visual_tokens": n_visual,
    }
