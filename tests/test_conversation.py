"""Conversation: compress once + KV reuse equals encoding the whole dialogue from scratch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_image

from mc_core.adapters import for_model
from mc_core.compressors import build
from mc_core.conversation import (
    BatchConversation,
    Conversation,
    compress_inputs,
    reset_state,
    token_dim,
)
from mc_core.dialogue import render

# One torch thread for this module (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


QUESTIONS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]

# Cached and from-scratch forwards run the same float32 maths in different matmul shapes:
# measured differences are ~1e-7; 1e-5 leaves room for summation order, not for a wrong cache.
ATOL = 1e-5


def _scratch_logits(model, processor, adapter, conv, k, images, compressor):
    """Next-token logits after turn k's prompt, from one forward over the whole rendering."""
    text = render(processor, conv.questions[: k + 1], conv.answers[:k], n_images=len(images))
    inputs = dict(processor(text=[text], images=images, return_tensors="pt"))
    reset_state(adapter)
    if compressor is None:
        full = inputs
    elif compressor.prompt_dependent:
        # FastV keeps the turn-1 choice: reuse the conversation's tokens.
        full = adapter.inputs_with(inputs, conv.tokens)
    else:
        # Independent path: compress again from the full dialogue's pixels.
        full, _, _ = compress_inputs(model, adapter, compressor, inputs)
    with torch.no_grad():
        return model(**full).logits[0, -1]


@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("llava", None),
        ("llava", "sample"),
        ("llava", "fastv"),
        ("llava_next", "pool"),
        ("qwen2_vl", "sample"),
        ("internvl", "sample"),
    ],
)
def test_cached_turns_equal_from_scratch(tiny, family, method):
    model, processor = tiny(family)
    adapter = for_model(model)
    dim = token_dim(model)
    compressor = None if method is None else build(method, rate=0.5, dim=dim)
    images = [make_image(48, 64, seed=3)]
    conv = Conversation(model, processor, compressor, images=images, max_new_tokens=3)
    for q in QUESTIONS:
        answer = conv.ask(q)
        assert isinstance(answer, str)
    assert len(conv.first_logits) == 3 and len(conv.prefill_s) == 3
    for k in range(3):
        ref = _scratch_logits(model, processor, adapter, conv, k, images, compressor)
        torch.testing.assert_close(conv.first_logits[k], ref.float(), atol=ATOL, rtol=0)
    n_all = Conversation(model, processor, None, images=images)
    n_all.ask(QUESTIONS[0])
    if compressor is not None:
        # m = ceil(0.5 n) per image, and the cache really holds fewer tokens than without it.
        assert conv.cache_tokens[0] < n_all.cache_tokens[0]
        assert sum(conv.visual_tokens) == sum(p.shape[0] for p in conv.P)
    # Later turns feed only the new text: the cache grows by the new chunk, not the prompt.
    assert conv.cache_tokens[1] - conv.cache_tokens[0] < conv.cache_tokens[0]


@pytest.mark.parametrize(
    ("family", "method"), [("llava", "sample"), ("qwen2_vl", None), ("qwen2_vl", "sample")]
)
def test_batch_equals_one_by_one(tiny, family, method):
    """Rows interleave turn by turn; Qwen's per-dialogue M-RoPE offsets (which differ per
    image size without compression) must not leak from one row to the next."""
    model, processor = tiny(family)
    compressor = None if method is None else build(method, rate=0.75, dim=token_dim(model))
    images = [make_image(h, w, seed=s) for s, (h, w) in enumerate([(64, 64), (56, 112), (112, 84)])]
    questions = [
        QUESTIONS,
        list(reversed(QUESTIONS)),
        [QUESTIONS[1], QUESTIONS[0], "what shape is at row 0 col 0 ?"],
    ]
    batch = BatchConversation(model, processor, compressor, images=images, max_new_tokens=4)
    batched = [batch.ask([q[k] for q in questions]) for k in range(3)]
    for i, img in enumerate(images):
        single = Conversation(model, processor, compressor, images=img, max_new_tokens=4)
        for k in range(3):
            assert single.ask(questions[i][k]) == batched[k][i]
            torch.testing.assert_close(
                single.first_logits[k], batch.rows[i].first_logits[k], atol=0, rtol=0
            )
    if compressor is not None:
        # m = ceil(0.25 n) per image (n differs per image for Qwen's dynamic resolution).
        assert batch.visual_tokens == [[math.ceil(0.25 * r.P[0].shape[1])] for r in batch.rows]


def test_gold_history_changes_what_later_turns_see(tiny):
    model, processor = tiny("llava")
    conv = Conversation(model, processor, None, images=make_image(64, 64), max_new_tokens=2)
    conv.ask(QUESTIONS[0])
    conv.set_answer(0, "red")
    conv.ask(QUESTIONS[1])
    assert conv.answers[0] == "red"
    text = render(processor, conv.questions, ["red"])
    assert text.startswith(conv._text) or conv._text == text
    with pytest.raises(ValueError, match="only the last answered turn"):
        conv.set_answer(0, "blue")


def test_bad_arguments(tiny):
    model, processor = tiny("llava")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Conversation(model, processor, images=make_image(64, 64), max_new_tokens=0)
    with pytest.raises(ValueError, match="images is empty"):
        Conversation(model, processor, images=[])
    conv = Conversation(model, processor, images=make_image(64, 64))
    with pytest.raises(ValueError, match="question"):
        conv.ask("  ")
    batch = BatchConversation(model, processor, images=[make_image(64, 64)])
    with pytest.raises(ValueError, match="1 dialogues"):
        batch.ask(["a ?", "b ?"])
