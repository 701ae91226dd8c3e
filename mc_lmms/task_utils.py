"""Callbacks of a generated multi-turn task (``output_type: generate_until_multi_round``).

lmms-eval hands the model one document per dialogue; the model asks ``doc_to_text(doc)`` (turn
1), then calls ``doc_to_text(doc, previous_output=..., round_idx=k)`` for each next turn until
it says the dialogue is over, and returns one answer per turn. ``process_results`` scores each
turn with ``mc_core.evaluation.scoring.score_answer``, the project evaluator's own metric (VQA soft
accuracy against several human answers, normalised exact match against one), so lmms-eval's
``acc_turn_<k>`` equal the evaluator's ``acc_turn[k - 1]`` on the same answers.
"""

from __future__ import annotations

from typing import Any

from mc_core.data.images import to_rgb
from mc_core.evaluation.scoring import score_answer

__all__ = ["doc_to_text", "doc_to_visual", "metric_names", "process_results"]


def doc_to_visual(doc: dict[str, Any]) -> list:
    """The dialogue's image (first turn only), as RGB."""
    image = doc["image"]
    images = list(image) if isinstance(image, list | tuple) else [image]
    return [to_rgb(im) for im in images]


def doc_to_text(
    doc: dict[str, Any],
    lmms_eval_specific_kwargs: dict | None = None,
    previous_output: list[str] | None = None,
    round_idx: int | None = None,
    previous_round_info: Any = None,
):
    """Turn 1's question; for ``round_idx`` k >= 1, ``(visuals, text, terminal, outputs, info)``
    with the question of turn k + 1, or ``terminal=True`` once every turn is asked."""
    questions = doc["questions"]
    if round_idx is None:
        return questions[0]
    outputs = list(previous_output or [])
    if round_idx >= len(questions):
        return None, None, True, outputs, previous_round_info
    # No new visuals: the first turn's (compressed) image serves the whole dialogue.
    return None, questions[round_idx], False, outputs, previous_round_info


def metric_names(turns: int) -> list[str]:
    """``acc_turn_1`` .. ``acc_turn_<turns>`` and ``acc_avg``."""
    return [f"acc_turn_{k + 1}" for k in range(turns)] + ["acc_avg"]


def _answers(results: Any) -> list[str]:
    # lmms-eval passes [list_of_turn_answers] (one request per document).
    if isinstance(results, list) and len(results) == 1 and isinstance(results[0], list | tuple):
        results = results[0]
    if not isinstance(results, list | tuple) or not all(isinstance(r, str) for r in results):
        raise ValueError(f"expected one answer string per turn, got {results!r}")
    return [r.strip() for r in results]


def process_results(doc: dict[str, Any], results: Any) -> dict[str, float]:
    """Per-turn accuracy of one dialogue, plus its mean over turns.

    Raises:
        ValueError: the model returned a different number of answers than the dialogue has
            turns (naming the dialogue).
    """
    answers = _answers(results)
    sets = doc["answer_sets"]
    if len(answers) != len(sets):
        raise ValueError(
            f"dialogue {doc.get('dialogue_id')!r}: {len(answers)} answers for {len(sets)} turns"
        )
    scores = [score_answer(a, s) for a, s in zip(answers, sets, strict=True)]
    out = {f"acc_turn_{k + 1}": s for k, s in enumerate(scores)}
    out["acc_avg"] = sum(scores) / len(scores)
    return out
