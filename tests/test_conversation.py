"""Conversation: compress once + KV reuse equals encoding the whole dialogue from scratch."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_image

from mc_core.compressors import build
from mc_core.inference.compress import compress_inputs
from mc_core.inference.conversation import Conversation
from mc_core.inference.dialogue import render
from mc_core.inference.engine import BatchConversation
from mc_core.models.adapters import POSITIONS
from mc_core.models.families import adapter_for
from mc_core.runtime import token_dim

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
    adapter.reset_state()
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


# Every registered family (conftest FAMILIES) under both position options (adapters.POSITIONS).
@pytest.mark.parametrize(
    ("family", "method", "positions"),
    # Uncompressed in every family: the engine's own positions and cache against a stock
    # forward of the whole dialogue (Qwen places its image tokens from their grid there).
    [(f, None, None) for f in FAMILIES]
    + [("llava", "fastv", None), ("llava_next", "pool", None)]
    + [(f, "sample", p) for f in FAMILIES for p in POSITIONS],
)
def test_cached_turns_equal_from_scratch(tiny, family, method, positions):
    model, processor = tiny(family)
    adapter = adapter_for(model, positions=positions)
    dim = token_dim(model)
    compressor = None if method is None else build(method, rate=0.5, dim=dim)
    images = [make_image(48, 64, seed=3)]
    conv = Conversation(
        model, processor, compressor, images=images, max_new_tokens=3, adapter=adapter
    )
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


# Batched dialogues against this sequential path: tests/test_batching.py.


def test_gold_history_changes_what_later_turns_see(tiny):
    model, processor = tiny("llava")
    conv = Conversation(model, processor, None, images=make_image(64, 64), max_new_tokens=2)
    conv.ask(QUESTIONS[0])
    conv.set_answer(0, "red")
    conv.ask(QUESTIONS[1])
    assert conv.answers[0] == "red"
    text = render(processor, conv.questions, ["red"])
    assert text.startswith(conv.text) or conv.text == text
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
