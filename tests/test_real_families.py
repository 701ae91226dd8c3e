"""Real tokenizers and chat templates end to end through mc_core, for every family, offline.

Each family's snapshot (tests/hf_snapshots.py) is a local Hugging Face folder: its real model and
processor classes, a trained byte-level BPE tokenizer and the released chat template. These tests
load it as a real checkpoint and run the library on GQA-fixture dialogues: teacher-forcing
encodings, the P = I identity, compression, teacher-target training and multi-turn evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from hf_snapshots import SHORT_ANSWER, load_snapshot
from PIL import Image
from transformers import AutoModelForImageTextToText

from mc_core.compressors import build
from mc_core.compressors.ops import kept_tokens
from mc_core.inference.conversation import Conversation
from mc_core.inference.dialogue import default_instruction, encode_dialogue, render
from mc_core.inference.engine import BatchConversation, greedy_answers
from mc_core.models import families
from mc_core.models.families import adapter_for
from mc_core.runtime import token_dim
from mc_core.training.loop import TrainConfig, train
from mc_core.training.targets import TEACHER_ANSWER_TOKENS, build_target_cache

GQA = Path(__file__).parent / "fixtures" / "gqa"


def _gqa_dialogues() -> list[dict]:
    """The fixture's questions grouped by image into 3-turn dialogues (schema-like rows)."""
    questions = json.loads((GQA / "testdev_balanced_questions.json").read_text())
    by_image: dict[str, list[dict]] = {}
    for q in questions.values():
        by_image.setdefault(q["imageId"], []).append(q)
    rows = []
    for image_id, qs in sorted(by_image.items()):
        qs = qs[:3]
        if len(qs) < 3:
            continue
        rows.append(
            {
                "dialogue_id": image_id,
                "image": Image.open(GQA / "images" / f"{image_id}.jpg").convert("RGB"),
                "questions": [q["question"] for q in qs],
                "answers": [q["answer"] for q in qs],
                "answer_sets": [[q["answer"]] for q in qs],
            }
        )
    return rows


@pytest.fixture(scope="module")
def snapshot(hf_snapshot, one_thread):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_snapshot(hf_snapshot(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def dialogues():
    return _gqa_dialogues()


@pytest.mark.parametrize("family", FAMILIES)
def test_snapshot_is_a_loadable_hf_checkpoint(family, hf_snapshot, snapshot):
    folder = hf_snapshot(family)
    fam = families.get(family)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 5 * 2**20, f"{family} snapshot is {size} bytes"
    assert families.for_config(folder) is fam
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    assert type(model) is fam.model_class
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["processor_class"] == fam.stock_processor_class.__name__
    _, processor = snapshot(family)
    assert isinstance(processor, fam.stock_processor_class)
    tok = processor.tokenizer
    # Byte-level BPE: any text round-trips, nothing is unknown.
    text = "Is the umbrella über-blue? 42"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert default_instruction(processor) == SHORT_ANSWER


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_positions_predict_exactly_the_answer_tokens(family, snapshot, dialogues):
    model, processor = snapshot(family)
    row = dialogues[0]
    # Multi-token answers: a multi-word one and whatever BPE splits.
    answers = [row["answers"][0], "white ceramic plate", row["answers"][2]]
    inputs, positions = encode_dialogue(processor, [row["image"]], row["questions"], answers)
    ids = inputs["input_ids"][0]
    text = render(processor, row["questions"], answers)
    assert text.count(SHORT_ANSWER) == 3
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(families.get(family).specials["end_of_turn"])
    said = ids[positions + 1].tolist()
    # Split the supervised tokens into turns at the end-of-turn token (ChatML writes one after
    # every answer; llava-hf's template writes none, so there each turn is its words only).
    turns, cur = [], []
    for t in said:
        if t == end:
            turns.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        turns.append(cur)
    if end in said:
        assert said.count(end) == 3
        decoded = [tok.decode(t).strip() for t in turns]
    else:
        decoded = tok.decode(said).split()
        decoded = [decoded[0], " ".join(decoded[1:4]), decoded[4]]
    assert decoded == answers
    assert max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) > 1
    # Each answer's tokens are the ones the template puts in the sequence (in-context BPE).
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert logits[positions].shape == (len(positions), logits.shape[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_compression_reproduces_the_stock_logits(family, snapshot, dialogues):
    model, processor = snapshot(family)
    row = dialogues[1]
    inputs, positions = encode_dialogue(processor, [row["image"]], row["questions"], row["answers"])
    adapter = adapter_for(model)
    with torch.no_grad():
        stock = model(**inputs).logits[0, positions]
        adapter.reset_state()
        tokens = adapter.visual_tokens(inputs)
        eye = [torch.eye(t.shape[0]) for t in tokens]
        adapter.reset_state()
        same = model(**adapter.inputs_with(inputs, tokens, P=eye)).logits[0, positions]
    torch.testing.assert_close(same, stock, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_targets_are_the_models_greedy_answers(family, snapshot, dialogues):
    model, processor = snapshot(family)
    rows = dialogues[:2]
    said = greedy_answers(
        model,
        processor,
        [r["image"] for r in rows],
        [r["questions"] for r in rows],
        max_new_tokens=TEACHER_ANSWER_TOKENS,
    )
    # The same answers as a plain multi-turn conversation with all visual tokens.
    for r, answers in zip(rows, said, strict=True):
        conv = Conversation(
            model, processor, images=[r["image"]], max_new_tokens=TEACHER_ANSWER_TOKENS
        )
        assert [conv.ask(q) for q in r["questions"]] == answers
    cache = build_target_cache(
        model, processor, rows, device="cpu", progress=False, topk=None, targets="teacher"
    )
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(families.get(family).specials["end_of_turn"])
    for r, entry, answers in zip(rows, cache.entries, said, strict=True):
        # A random model may say nothing (EOS or only special tokens first): that turn keeps
        # its gold answer; every other turn teacher-forces exactly what the model said.
        used = [a or g for a, g in zip(answers, r["answers"], strict=True)]
        inputs, positions = encode_dialogue(processor, [r["image"]], r["questions"], used)
        assert torch.equal(entry.positions, positions)
        # ChatML closes each answer with the end token; llava-hf's words carry their spaces.
        forced = [[]]
        for t in inputs["input_ids"][0, positions + 1].tolist():
            forced.append([]) if t == end else forced[-1].append(t)
        text = " ".join(tok.decode(t, skip_special_tokens=True) for t in forced)
        assert text.split() == " ".join(used).split()
        assert entry.target.shape == (len(positions), model.config.get_text_config().vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_metacompress_trains_on_teacher_targets(family, snapshot, dialogues):
    model, processor = snapshot(family)
    cfg = TrainConfig(
        max_steps=3,
        batch_size=2,
        lr=0.05,
        grad_clip=1.0,
        device="cpu",
        progress=False,
        targets="teacher",
        target_topk=8,
        checkpoint_every=100,
    )
    seen: list[dict] = []
    comp = train(
        cfg, model, processor, dialogues, rate=0.5, callbacks=[lambda s, m: seen.append(m)]
    )
    assert seen and all(math.isfinite(m["loss"]) for m in seen)
    x = adapter_for(model).visual_tokens(
        processor(
            text=[render(processor, ["q"], [])], images=[dialogues[0]["image"]], return_tensors="pt"
        )
    )[0]
    y, P = comp(x)
    assert y.shape[0] == kept_tokens(x.shape[0], 0.5)
    assert torch.allclose(P.sum(-1), torch.ones(P.shape[0]), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_conversation_with_sample_matches_single_dialogues(family, snapshot, dialogues):
    model, processor = snapshot(family)
    rows = dialogues[:2]
    comp = build("sample", rate=0.5, dim=token_dim(model))
    batch = BatchConversation(
        model, processor, comp, images=[r["image"] for r in rows], max_new_tokens=5
    )
    got = [batch.ask([r["questions"][k] for r in rows]) for k in range(3)]
    for j, r in enumerate(rows):
        conv = Conversation(model, processor, comp, images=[r["image"]], max_new_tokens=5)
        assert [conv.ask(q) for q in r["questions"]] == [got[k][j] for k in range(3)]
        n = sum(batch.rows[j].visual_tokens)
        assert n == sum(conv.visual_tokens)
        assert batch.rows[j].text == conv.text
        assert batch.rows[j].text.count(SHORT_ANSWER) == 3
