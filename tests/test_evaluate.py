"""Evaluation: scoring on hand-made answers, the metrics schema, reference self-consistency."""

from __future__ import annotations

import io
import json
import math

import datasets
import pytest
import torch
from conftest import build_llava, make_image

from mc_core.compressors import build
from mc_core.data.schema import FEATURES
from mc_core.evaluation.runner import centre_mass, evaluate, write_report
from mc_core.evaluation.scoring import (
    score_answer,
    score_by_type,
    score_dialogues,
    score_matrix,
    score_turns,
)
from mc_core.evaluation.token_maps import token_maps
from mc_core.inference.conversation import Conversation

# One torch thread for this module (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = {"acc_turn", "acc_avg", "kl_to_full", "prefill_ms", "visual_tokens", "prefill_tflops"}
QUESTIONS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]


def test_exact_match_scores_normalised_answers():
    assert score_answer("Red", ["red"]) == 1.0
    assert score_answer("two", ["2"]) == 1.0  # number words normalise to digits
    assert score_answer("a circle", ["circle"]) == 1.0  # articles dropped
    assert score_answer("blue", ["red"]) == 0.0


def test_vqa_soft_accuracy_with_ten_answers():
    humans = ["red"] * 3 + ["blue"] * 7
    assert score_answer("red", humans) == pytest.approx(0.9)  # k = 3 of 10 agree
    assert score_answer("blue", humans) == pytest.approx(1.0)
    assert score_answer("green", humans) == 0.0
    assert score_answer("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)


def test_score_turns_averages_per_turn():
    preds = [["red", "2", "yes"], ["blue", "3", "yes"]]
    sets = [[["red"], ["2"], ["no"]], [["red"], ["3"], ["yes"]]]
    assert score_turns(preds, sets) == [0.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="dialogue 1"):
        score_turns([["red", "2", "yes"], ["blue"]], sets)


def test_score_matrix_scores_each_answer_and_feeds_the_summaries():
    preds = [["red", "2", "yes"], ["blue", "3"]]
    sets = [[["red"], ["2"], ["no"]], [["red"], ["3"]]]
    assert score_matrix(preds, sets) == [[1.0, 1.0, 0.0], [0.0, 1.0]]
    # Per dialogue, dialogues may differ in length; per turn they may not.
    assert score_dialogues(preds, sets) == [pytest.approx(2 / 3), 0.5]
    with pytest.raises(ValueError, match="dialogue 1: 2 turns"):
        score_turns(preds, sets)
    with pytest.raises(ValueError, match="dialogue 0: 2 answers for 3 turns"):
        score_matrix([["red", "2"], ["blue", "3"]], sets)
    with pytest.raises(ValueError, match="0 predicted dialogues vs 2"):
        score_dialogues([], sets)


def test_score_by_type_groups_turns_by_the_datasets_own_labels():
    preds = [["red", "2", "yes"], ["blue", "no", "3"]]
    rows = [
        {"question_types": ["colour", "count", "exist"], "answer_sets": [["red"], ["2"], ["no"]]},
        {"question_types": ["colour", "exist", "count"], "answer_sets": [["red"], ["no"], ["3"]]},
    ]
    by = score_by_type(preds, rows)
    assert by == {
        "colour": {"acc": 0.5, "n": 2},
        "count": {"acc": 1.0, "n": 2},  # turn 2 of dialogue 1, turn 3 of dialogue 2
        "exist": {"acc": 0.5, "n": 2},  # "yes" against "no", then "no" against "no"
    }
    # Turn-weighted: the types' accuracies recombine into the mean over all turns.
    total = sum(v["acc"] * v["n"] for v in by.values()) / sum(v["n"] for v in by.values())
    assert total == pytest.approx(sum(score_turns(preds, [r["answer_sets"] for r in rows])) / 3)
    # No type per turn: not measurable rather than mislabelled.
    assert score_by_type(preds, [{**r, "question_types": []} for r in rows]) is None


def _dataset(answers_per_dialogue: list[list[str]]) -> datasets.Dataset:
    rows: dict[str, list] = {k: [] for k in FEATURES}
    for i, ans in enumerate(answers_per_dialogue):
        buf = io.BytesIO()
        make_image(64, 64, seed=200 + i).save(buf, format="PNG")
        rows["dialogue_id"].append(f"e{i}")
        rows["source"].append("synthetic")
        rows["image_id"].append(f"e{i}")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["questions"].append(QUESTIONS)
        rows["answers"].append(ans)
        rows["answer_sets"].append([[a] for a in ans])
        rows["question_types"].append(["colour", "count", "exist"])
        rows["targets"].append(["", "", ""])
    return datasets.Dataset.from_dict(rows, features=FEATURES)


@pytest.fixture(scope="module")
def cell():
    model, processor = build_llava()
    # Gold answers = the uncompressed model's own greedy answers (single words, so they
    # survive normalisation): the `none` reference must then score 1.0 on every turn.
    own = []
    for i in range(3):
        buf = io.BytesIO()
        make_image(64, 64, seed=200 + i).save(buf, format="PNG")
        conv = Conversation(
            model, processor, images=make_image(64, 64, seed=200 + i), max_new_tokens=1
        )
        own.append([conv.ask(q) or "none" for q in QUESTIONS])
    data = _dataset(own)
    meta = build("metacompress", rate=0.5, dim=64, d_c=16)
    report = evaluate(
        model,
        processor,
        data,
        ["none", "sample", "fastv", "metacompress"],
        0.5,
        compressors={"metacompress": meta},
        max_dialogues=3,
        device="cpu",
        batch_size=2,
        max_new_tokens=1,
        arch="tiny-llava",
        dataset_name="unit",
        progress=False,
    )
    return model, processor, data, meta, report


def test_report_schema_and_reference(cell):
    _, _, _, _, report = cell
    assert report["arch"] == "tiny-llava" and report["rate"] == 0.5 and report["dataset"] == "unit"
    assert set(report["methods"]) == {"none", "sample", "fastv", "metacompress"}
    for name, m in report["methods"].items():
        assert set(m) >= KEYS, name
        assert len(m["acc_turn"]) == 3 and all(0.0 <= a <= 1.0 for a in m["acc_turn"])
        assert m["acc_avg"] == pytest.approx(sum(m["acc_turn"]) / 3)
        assert m["prefill_ms"] > 0 and math.isfinite(m["kl_to_full"])
    ref = report["methods"]["none"]
    assert ref["acc_turn"] == [1.0, 1.0, 1.0]
    assert report["n_dialogues"] == 3
    assert ref["acc_avg_ci"] == [1.0, 1.0]  # every dialogue scores 1: no spread to resample
    for name, m in report["methods"].items():
        lo, hi = m["acc_avg_ci"]
        assert 0.0 <= lo <= m["acc_avg"] <= hi <= 1.0, name
        # One score per dialogue (dataset order) whose mean is acc_avg: the pairing unit.
        assert len(m["acc_dialogues"]) == 3, name
        assert sum(m["acc_dialogues"]) / 3 == pytest.approx(m["acc_avg"], abs=1e-6), name
        # One turn of each type per dialogue here, so each type's accuracy is that turn's.
        by = m["acc_by_type"]
        assert list(by) == ["colour", "count", "exist"], name
        assert [by[t]["acc"] for t in by] == pytest.approx(m["acc_turn"]), name
        assert all(by[t]["n"] == 3 for t in by), name
    assert ref["kl_to_full"] == 0.0 and ref["visual_tokens"] == 64
    # No object_centres column here: the metric does not apply, for any method.
    assert all(m["centre_mass"] is None for m in report["methods"].values())
    for name in ("sample", "fastv", "metacompress"):
        m = report["methods"][name]
        assert m["visual_tokens"] == 32  # ceil((1 - 0.5) * 64)
        assert m["kl_to_full"] > 0  # random model: any change of tokens moves the logits
        assert m["prefill_tflops"] < ref["prefill_tflops"]


def test_centre_mass_counts_what_p_gives_each_object_centre(cell):
    from mc_core.compressors.ops import selection_matrix
    from mc_core.inference.dialogue import encode_dialogue
    from mc_core.models.families import adapter_for

    model, processor, _, _, _ = cell
    adapter = adapter_for(model)
    inputs, _ = encode_dialogue(processor, [make_image(64, 64, seed=1)], ["q ?"], ["a"])
    pos = adapter.contexts(inputs)[0].positions  # (64, 2): an 8 x 8 grid on the image
    n = pos.shape[0]
    a, b = 2 * 8 + 3, 5 * 8 + 6  # two tokens; the centres sit on them
    centres = [pos[a].tolist(), pos[b].tolist()]
    others = torch.tensor([i for i in range(n) if i not in (a, b)][:30])
    both = selection_matrix(torch.cat([torch.tensor([a, b]), others]), n)
    one = selection_matrix(torch.cat([torch.tensor([a]), others, torch.tensor([0])]), n)
    assert centre_mass(adapter, inputs, centres, [both]) == pytest.approx(1.0)
    assert centre_mass(adapter, inputs, centres, [one]) == pytest.approx(0.5)
    # Soft rows: half of one row on a, then b twice in full (capped at 1): (0.5 + 1) / 2.
    soft = torch.zeros(3, n)
    soft[0, a], soft[0, 0] = 0.5, 0.5
    soft[1, b] = soft[2, b] = 1.0
    assert centre_mass(adapter, inputs, centres, [soft]) == pytest.approx(0.75)
    assert centre_mass(adapter, inputs, [], [both]) is None  # no objects
    assert centre_mass(adapter, inputs, centres, None) is None  # uncompressed


def test_gold_history_and_errors(cell):
    model, processor, data, _, _ = cell
    gold = evaluate(
        model,
        processor,
        data,
        ["none"],
        0.5,
        history="gold",
        max_dialogues=2,
        device="cpu",
        max_new_tokens=1,
        progress=False,
    )
    # With gold history = the model's own answers, nothing changes for the reference.
    assert gold["methods"]["none"]["acc_turn"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="must be trained"):
        evaluate(model, processor, data, ["metacompress"], 0.5, device="cpu", progress=False)
    with pytest.raises(ValueError, match="history"):
        evaluate(model, processor, data, ["none"], 0.5, history="oracle", progress=False)
    with pytest.raises(ValueError, match="rate"):
        evaluate(model, processor, data, ["none"], 1.5, progress=False)
    with pytest.raises(ValueError, match="not registered"):
        evaluate(model, processor, data, ["magic"], 0.5, device="cpu", progress=False)


def test_write_report_is_atomic_json(cell, tmp_path):
    _, _, _, _, report = cell
    path = write_report(report, tmp_path / "eval" / "tiny-llava-0.5.json")
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    bad = json.loads(json.dumps(report))
    bad["methods"]["none"]["kl_to_full"] = float("nan")
    with pytest.raises(ValueError, match="kl_to_full"):
        write_report(bad, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_token_maps_column_mass(cell):
    model, processor, data, meta, _ = cell
    comps = {"metacompress": meta, "fastv": build("fastv", rate=0.5, dim=64)}
    maps = token_maps(model, processor, data, comps, indices=[0, 1])
    assert len(maps) == 2
    for entry in maps:
        assert entry["grid"] == (8, 8) and entry["positions"].shape == (64, 2)
        for mass in entry["mass"].values():
            # Rows of P sum to 1: the column mass sums to m = 32.
            assert mass.shape == (64,)
            torch.testing.assert_close(mass.sum(), torch.tensor(32.0), atol=1e-4, rtol=0)
        # FastV keeps whole tokens: its column mass is 0/1.
        assert set(entry["mass"]["fastv"].unique().tolist()) <= {0.0, 1.0}


def test_prefill_flops_by_hand():
    from transformers import LlamaConfig, LlavaConfig

    from mc_core.inference.flops import prefill_flops

    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    s, h, kv = 10, 64, 2 * 16
    per_layer = 2 * s * h * (h + 2 * kv) + 2 * s * h * h + 2 * s * s * h + 3 * 2 * s * h * 128
    expected = 2 * per_layer + 2 * h * 100
    assert prefill_flops(text, s) == expected
    # An LVLM config counts its language model only.
    assert prefill_flops(LlavaConfig(text_config=text.to_dict()), s) == expected
    with pytest.raises(ValueError, match="seq_len"):
        prefill_flops(text, 0)
