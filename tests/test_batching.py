"""BatchConversation: padded batches give every dialogue the logits of its own Conversation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, make_image

from mc_core.compressors import build
from mc_core.inference.conversation import Conversation
from mc_core.inference.engine import BatchConversation
from mc_core.models.families import adapter_for
from mc_core.runtime import token_dim

pytestmark = pytest.mark.usefixtures("one_thread")

# Batched and single forwards run the same float32 maths in different matmul shapes, with
# masked padding: measured differences are ~1e-7; 1e-5 is the bound and leaves room
# for summation order, not for a wrong position, mask or cache row.
ATOL = 1e-5

QUESTIONS = [
    ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"],
    ["how many ?", "what shape is at row 0 col 0 of the square ?", "yes ?"],
    ["is there a red triangle in row 3 ?", "what colour ?", "how many blue circle are there ?"],
]
# Different sizes: dynamic-resolution families get different n per dialogue, so the first
# prompts differ in length and need padding; the questions differ in length at every turn.
SIZES = [(64, 64), (56, 112), (112, 84)]


def _check_family(
    tiny, family: str, method: str | None, rate: float = 0.75, positions: str | None = None
) -> None:
    model, processor = tiny(family)
    comp = None if method is None else build(method, rate=rate, dim=token_dim(model))
    adapter = None if positions is None else adapter_for(model, positions=positions)
    images = [make_image(h, w, seed=s) for s, (h, w) in enumerate(SIZES)]
    torch.manual_seed(0)
    batch = BatchConversation(
        model, processor, comp, images=images, max_new_tokens=3, adapter=adapter
    )
    batched = [batch.ask([q[k] for q in QUESTIONS]) for k in range(3)]
    for i, img in enumerate(images):
        torch.manual_seed(0)
        single = Conversation(model, processor, comp, images=img, max_new_tokens=3, adapter=adapter)
        for k in range(3):
            answer = single.ask(QUESTIONS[i][k])
            torch.testing.assert_close(
                batch.rows[i].first_logits[k], single.first_logits[k], atol=ATOL, rtol=0
            )
            assert answer == batched[k][i], (family, method, i, k)
        assert batch.rows[i].cache_tokens == single.cache_tokens
        assert batch.rows[i].visual_tokens == single.visual_tokens
    if comp is not None:
        for row in batch.rows:
            assert row.visual_tokens == [math.ceil((1 - rate) * p.shape[1]) for p in row.P]


@pytest.mark.parametrize("family", sorted(TINY))
def test_batch_matches_sequential_every_family(tiny, family):
    _check_family(tiny, family, "sample")


@pytest.mark.parametrize(
    ("family", "method"),
    [("llava", None), ("qwen2_vl", None), ("llava", "fastv"), ("qwen2_vl", "fastv")],
)
def test_batch_matches_sequential_uncompressed_and_prompt_dependent(tiny, family, method):
    """No compression (Qwen's own M-RoPE offsets per row) and FastV (each dialogue ranked by
    its own first prompt, in a padded batch)."""
    _check_family(tiny, family, method)


@pytest.mark.parametrize(
    ("family", "positions"),
    [("llava", "source"), ("qwen2_vl", "packed"), ("internvl", "source")],
)
def test_batch_matches_sequential_in_the_other_position_mode(tiny, family, positions):
    """Each family's non-default position mode: the batch keeps the adapter's `source`
    positions (1-D RoPE families) and gives Qwen's grid-less `packed` tokens plain positions,
    exactly as the single conversation does."""
    _check_family(tiny, family, "sample", positions=positions)


def test_padding_really_happens(tiny):
    """The equality above is not vacuous: the batch pads both the first prompt and later turns."""
    model, processor = tiny("qwen2_vl")
    images = [make_image(h, w, seed=s) for s, (h, w) in enumerate(SIZES)]
    batch = BatchConversation(model, processor, None, images=images, max_new_tokens=2)
    batch.ask([q[0] for q in QUESTIONS])
    first = batch._mask.clone()
    assert len({int(v) for v in first.sum(-1)}) > 1  # different prompt lengths
    batch.ask([q[1] for q in QUESTIONS])
    later = batch._mask[:, first.shape[1] :]
    assert (later == 0).any() and (later.sum(-1) > 0).all()  # holes, yet every row grew


def test_gold_history_and_bad_arguments(tiny):
    model, processor = tiny("llava")
    images = [make_image(64, 64, seed=s) for s in range(2)]
    batch = BatchConversation(model, processor, None, images=images, max_new_tokens=2)
    with pytest.raises(ValueError, match="2 dialogues"):
        batch.ask(["a ?"])
    with pytest.raises(ValueError, match="non-empty"):
        batch.ask(["what ?", " "])
    batch.ask(["what colour ?", "how many ?"])
    batch.set_answers(["red", "2"])
    batch.ask(["what shape ?", "yes ?"])
    assert [r.answers[0] for r in batch.rows] == ["red", "2"]
    assert "red" in batch.rows[0].text
    with pytest.raises(ValueError, match="images is empty"):
        BatchConversation(model, processor, images=[])
    with pytest.raises(ValueError, match="max_new_tokens"):
        BatchConversation(model, processor, images=images, max_new_tokens=0)
