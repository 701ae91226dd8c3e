"""A synthetic dialogue as teacher-forcing inputs, with the positions the recipe's losses read.

The encoding is ``mc_core.inference.dialogue.encode_dialogue`` (the processor's chat template and
pixel
path, as everywhere else); this module only adds where each turn's answer, end-of-turn token and
question slot words sit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mc_core.data import synthetic as S
from mc_core.inference.dialogue import encode_dialogue
from mc_core.training.teacher.layout import slot_words

__all__ = ["Encoded", "encode", "image_start"]


@dataclass
class Encoded:
    """One dialogue: processor inputs (batch of one) and per-turn positions in ``input_ids``."""

    inputs: dict
    answer_pos: list[int]  # logit positions predicting each turn's (one-token) answer
    answer_ids: list[int]
    end_ids: list[int]  # the token after each answer (end of turn), predicted at answer_pos + 1
    slots: list[tuple[int, int, int]]  # positions of each turn's three slot words
    image_start: int  # first visual placeholder


def image_start(input_ids: torch.Tensor, image_token_id: int) -> int:
    """Index of the first image placeholder in a ``[T]`` id row."""
    hits = (input_ids == image_token_id).nonzero()
    if not len(hits):
        raise ValueError("input_ids hold no image placeholder")
    return int(hits[0, 0])


def encode(processor, image, dialogue: S.Dialogue, image_token_id: int) -> Encoded:
    """Encodes all turns of ``dialogue`` about ``image`` (teacher forcing).

    Raises:
        ValueError: an answer is not exactly one token (the recipe's read-outs assume it).
    """
    qs, ans = list(dialogue.questions), list(dialogue.answers)
    inputs, pos = encode_dialogue(processor, [image], qs, ans, include_end=False)
    if len(pos) != len(qs):
        raise ValueError(f"answers {ans} must be one token each (got {len(pos)} positions)")
    ids = inputs["input_ids"][0]
    tok = processor.tokenizer
    slots = []
    for k, (q, t) in enumerate(zip(qs, dialogue.question_types, strict=True)):
        q_ids = torch.tensor(tok(q, add_special_tokens=False)["input_ids"])
        p = int(pos[k])
        # The question is the last occurrence of its words before the answer.
        start = max(
            i for i in range(p - len(q_ids) + 2) if torch.equal(ids[i : i + len(q_ids)], q_ids)
        )
        slots.append(tuple(start + j for j in slot_words(q, t)))
    answer_pos = [int(p) for p in pos]
    return Encoded(
        dict(inputs),
        answer_pos,
        [int(ids[p + 1]) for p in answer_pos],
        [int(ids[p + 2]) for p in answer_pos],
        slots,
        image_start(ids, image_token_id),
    )
