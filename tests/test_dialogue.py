"""Teacher forcing: answer positions, one-pass logits == per-turn prompts, batch collation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from mc_core.inference.conversation import Conversation
from mc_core.inference.dialogue import answer_token_ids, collate, encode_dialogue, messages
from mc_core.models.families import adapter_for

# One torch thread for this module (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


QUESTIONS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]
ANSWERS = ["red", "2", "yes"]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "internvl"])
def test_positions_predict_the_answer_tokens(tiny, family):
    _, processor = tiny(family)
    inputs, pos = encode_dialogue(processor, [make_image(64, 64)], QUESTIONS, ANSWERS)
    tok = processor.tokenizer
    got = tok.convert_ids_to_tokens(answer_token_ids(inputs, pos))
    end = tok.eos_token
    assert got == ["red", end, "2", end, "yes", end]
    words_only = encode_dialogue(
        processor, [make_image(64, 64)], QUESTIONS, ANSWERS, include_end=False
    )[1]
    assert tok.convert_ids_to_tokens(answer_token_ids(inputs, words_only)) == ANSWERS


def test_one_pass_equals_per_turn_prompts(tiny):
    """Teacher forcing's logits at each turn's first answer token equal a conversation's
    logits at that turn's prompt, with the gold answers as history."""
    model, processor = tiny("llava")
    image = make_image(64, 64, seed=5)
    inputs, pos = encode_dialogue(processor, [image], QUESTIONS, ANSWERS)
    with torch.no_grad():
        full = model(**inputs, logits_to_keep=pos).logits[0]  # (6, V)
    conv = Conversation(model, processor, images=image, max_new_tokens=1)
    for k, q in enumerate(QUESTIONS):
        conv.ask(q)
        conv.set_answer(k, ANSWERS[k])
        # Same float32 maths in other shapes: ~1e-7 apart; 1e-5 catches any shifted position.
        torch.testing.assert_close(full[2 * k], conv.first_logits[k], atol=1e-5, rtol=0)


def test_collate_pads_and_joins(tiny):
    model, processor = tiny("llava")
    adapter = adapter_for(model)
    rows, positions = [], []
    for i, qs in enumerate([QUESTIONS, ["how many red circle ?"] * 3]):
        inputs, pos = encode_dialogue(processor, [make_image(64, 64, seed=i)], qs, ANSWERS)
        tokens = adapter.visual_tokens(inputs)
        rows.append(adapter.inputs_with(inputs, [t[:16] for t in tokens]))
        positions.append(pos)
    lengths = [r["input_ids"].shape[1] for r in rows]
    assert lengths[0] != lengths[1]
    batch, shifts = collate(rows, pad_token_id=processor.tokenizer.pad_token_id, side="right")
    assert shifts == [0, 0] and batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert len(batch["mm_encoder_outputs"]["image"].pooler_output) == 2
    with torch.no_grad():
        together = model(**batch).logits
        for i, r in enumerate(rows):
            alone = model(**r).logits[0]
            # Right padding leaves every real position's causal context unchanged.
            torch.testing.assert_close(together[i, : lengths[i]], alone, atol=1e-5, rtol=0)
    left, shifts = collate(rows, pad_token_id=0, side="left")
    assert shifts == [max(lengths) - n for n in lengths]
    assert left["attention_mask"][:, -1].tolist() == [1, 1]


def test_bad_dialogues_raise(tiny):
    _, processor = tiny("llava")
    with pytest.raises(ValueError, match="one answer per question"):
        encode_dialogue(processor, [make_image(64, 64)], QUESTIONS, ANSWERS[:2])
    with pytest.raises(ValueError, match="questions\\[1\\]"):
        messages(["a ?", 3], ["b"])
    with pytest.raises(ValueError, match="side"):
        collate([{"input_ids": torch.ones(1, 2, dtype=torch.long)}], pad_token_id=0, side="up")
