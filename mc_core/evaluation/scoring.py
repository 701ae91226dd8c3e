"""Scoring answers: each answer once, then per turn, per dialogue and per question type.

Accuracy is exact match after VQA normalisation against a single gold answer, or VQA soft
accuracy where a turn has several human answers (VQAv2's ten): `mc_core.data.accuracy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mc_core.data.accuracy import exact_match, vqa_soft_accuracy

__all__ = [
    "by_type",
    "dialogue_means",
    "score_answer",
    "score_by_type",
    "score_dialogues",
    "score_matrix",
    "score_turns",
    "turn_means",
]


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
    return turn_means(score_matrix(preds, answer_sets))


def turn_means(scores: list[list[float]]) -> list[float]:
    turns = len(scores[0])
    for i, row in enumerate(scores):
        if len(row) != turns:
            raise ValueError(f"dialogue {i}: {len(row)} turns (expected {turns})")
    return [sum(col) / len(scores) for col in zip(*scores, strict=True)]


def dialogue_means(scores: list[list[float]]) -> list[float]:
    return [sum(row) / len(row) for row in scores]


def score_dialogues(
    preds: Sequence[Sequence[str]], answer_sets: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """Each dialogue's accuracy averaged over its turns (the unit the intervals resample)."""
    return dialogue_means(score_matrix(preds, answer_sets))


def score_by_type(
    preds: Sequence[Sequence[str]], rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float | int]] | None:
    """Accuracy per question type over every turn: ``{type: {"acc", "n"}}``, types sorted.

    The types are the dataset's own labels (``question_types``: GQA's structural types, VQAv2's
    answer types), so where a method loses shows without knowing the dataset. Turn-weighted:
    ``sum(acc * n) / sum(n)`` is the mean over all turns, ``acc_avg`` when every dialogue has
    the same number of turns. None where a row has no type per turn.
    """
    return by_type(score_matrix(preds, [r["answer_sets"] for r in rows]), rows)


def by_type(
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
