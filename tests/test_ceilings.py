"""Ceilings: the selector P, object-token lookup, the oracle's fit, the [CLS] overlap, and
the `ceilings` section of an evaluation on a tiny LLaVA."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from conftest import build_llava, make_image

from mc_core.compressors.ops import pool_matrix, validate
from mc_core.data import synthetic
from mc_core.data.schema import FEATURES, OPTIONAL_FEATURES
from mc_core.evaluation.ceiling_report import evaluate_ceilings
from mc_core.evaluation.ceilings import (
    PlanCompressor,
    cls_overlap,
    object_tokens,
    oracle_matrix,
    selector_matrix,
)
from mc_core.evaluation.runner import teacher_logits as _teacher_logits
from mc_core.inference.dialogue import encode_dialogue, to_device
from mc_core.models.adapters.positions import grid_positions
from mc_core.models.families import adapter_for
from mc_core.training.losses import answer_kl

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]


def test_selector_keeps_ground_truth_and_fills_equidistantly():
    P = selector_matrix([40, 3, 3, 17], n=64, m=8)
    validate(P, 64, 8)
    kept = P.argmax(1).tolist()
    assert {3, 17, 40} <= set(kept)
    assert kept == sorted(kept) and len(set(kept)) == 8  # packed in source order, distinct
    fill = sorted(set(kept) - {3, 17, 40})
    gaps = np.diff(fill)
    assert gaps.max() - gaps.min() <= 2  # equidistant over the remaining tokens (rounding)


def test_selector_thins_and_checks():
    kept = selector_matrix(list(range(0, 64, 2)), n=64, m=4).argmax(1).tolist()
    assert kept == [0, 20, 42, 62]  # an equidistant subset of the 32 given indices
    assert selector_matrix([], n=10, m=10).argmax(1).tolist() == list(range(10))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        selector_matrix([10], n=10, m=2)
    with pytest.raises(ValueError, match="m <= n"):
        selector_matrix([1], n=4, m=5)


def test_object_tokens_picks_the_covering_cell():
    pos = grid_positions(4, 4)
    idx = object_tokens([[0.1, 0.1], [0.6, 0.9], [0.99, 0.3]], pos)
    assert idx.tolist() == [0, 2 * 4 + 3, 3 * 4 + 1]
    assert object_tokens([], pos).numel() == 0


def test_synthetic_object_centres_sit_on_their_objects():
    cfg = synthetic.WorldConfig()
    ds = synthetic.generate(4, seed=5, cfg=cfg)
    for i in range(4):
        scene, _, _ = synthetic.example(5, i, cfg)
        _, ids = synthetic.render(scene, cfg)  # supersampled object-id map
        centres = ds[i]["object_centres"]
        assert len(centres) == len(scene.objects)
        for k, (r, c) in enumerate(centres):
            y, x = int(r * ids.shape[0]), int(c * ids.shape[1])
            assert ids[y, x] == k  # the centre pixel belongs to object k


def test_plan_compressor_replays_in_order_and_checks_shape():
    a, b = selector_matrix([1], 8, 4), selector_matrix([7], 8, 4)
    comp = PlanCompressor(rate=0.5, dim=3, plans=[lambda n, c: a, lambda n, c: b])
    x = torch.randn(8, 3)
    _, ps = comp([x, x])
    assert torch.equal(ps[0], a) and torch.equal(ps[1], b) and comp.remaining == 0
    with pytest.raises(ValueError, match="more images"):
        comp(x)
    bad = PlanCompressor(rate=0.5, dim=3, plans=[lambda n, c: selector_matrix([1], 8, 3)])
    with pytest.raises(ValueError, match="does not fit"):
        bad(x)


def test_cls_overlap_counts_shared_top_tokens():
    cls = torch.tensor([0.0, 5.0, 4.0, 0.1, 0.2, 3.0])
    assert cls_overlap(selector_matrix([1, 2, 5], 6, 3), cls) == 1.0
    assert cls_overlap(selector_matrix([0, 3, 4], 6, 3), cls) == 0.0
    assert cls_overlap(selector_matrix([0, 1, 4], 6, 3), cls) == pytest.approx(1 / 3)


def _dataset(n: int, with_centres: bool) -> datasets.Dataset:
    feats = datasets.Features({**FEATURES, **(OPTIONAL_FEATURES if with_centres else {})})
    rows: dict[str, list] = {k: [] for k in feats}
    for i in range(n):
        buf = io.BytesIO()
        make_image(64, 64, seed=300 + i).save(buf, format="PNG")
        rows["dialogue_id"].append(f"c{i}")
        rows["source"].append("synthetic")
        rows["image_id"].append(f"c{i}")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["questions"].append(QUESTIONS)
        rows["answers"].append(["red", "two", "yes"])
        rows["answer_sets"].append([["red"], ["two"], ["yes"]])
        rows["question_types"].append(["colour", "count", "exist"])
        rows["targets"].append(["", "", ""])
        if with_centres:
            rows["object_centres"].append([[0.2, 0.3], [0.7, 0.7]])
    return datasets.Dataset.from_dict(rows, features=feats)


@pytest.fixture(scope="module")
def llava():
    return build_llava()


def test_oracle_lowers_kl_below_its_pooling_start(llava):
    model, processor = llava
    adapter = adapter_for(model)
    row = _dataset(1, False)[0]
    inputs, positions, t_logits = _teacher_logits(model, processor, adapter, row, "cpu")
    rate = 0.75
    P, fit_kl = oracle_matrix(
        model, adapter, inputs, positions, t_logits, rate, steps=15, lr=0.3, eps=0.0, seed=0
    )
    validate(P, 64, 16, atol=1e-5)
    # The start point: pooling (the oracle's init up to the 1e-3 floor and the noise).
    with torch.no_grad():
        x = adapter.visual_tokens(inputs)[0]
        P0 = pool_matrix(64, 16, (8, 8))
        s = adapter.inputs_with(inputs, [P0 @ x], P=[P0])
        shift = inputs["input_ids"].shape[1] - s["input_ids"].shape[1]
        start_kl = float(
            answer_kl(t_logits, model(**s, logits_to_keep=positions - shift).logits[0])
        )
    assert fit_kl < start_kl  # 15 Adam steps on this dialogue's KL must improve on the start
    assert all(p.grad is None for p in model.parameters())  # only P_raw was trained


def test_evaluate_ceilings_report(llava):
    model, processor = llava
    out = evaluate_ceilings(
        model,
        processor,
        _dataset(3, True),
        0.75,
        oracle_dialogues=2,
        oracle_steps=2,
        oracle_lr=0.1,
        oracle_eps=0.01,
        device="cpu",
        batch_size=2,
        max_new_tokens=1,
        seed=1,
    )
    sel, orc = out["selector"], out["oracle"]
    assert set(sel) >= {"acc_turn", "acc_avg", "acc_avg_ci", "kl_to_full", "visual_tokens"}
    assert sel["visual_tokens"] == 16
    assert sel["acc_avg_ci"][0] <= sel["acc_avg"] <= sel["acc_avg_ci"][1]
    assert orc["dialogues"] == 2 and orc["steps"] == 2 and len(orc["indices"]) == 2
    assert orc["visual_tokens"] == 16 and "none_acc_avg" in orc
    cls = out["cls_overlap"]
    assert 0.0 <= cls["share"] <= 1.0 and cls["chance"] == pytest.approx(16 / 64)
    # A dataset without the optional ground truth skips the selector with a note.
    bare = evaluate_ceilings(
        model,
        processor,
        _dataset(2, False),
        0.75,
        oracle_dialogues=1,
        oracle_steps=1,
        device="cpu",
        max_new_tokens=1,
    )
    assert bare["selector"]["available"] is False and "object_centres" in bare["selector"]["note"]
    assert bare["oracle"]["dialogues"] == 1


def test_encode_dialogue_fixture_sanity(llava):
    # The teacher-forced inputs the oracle fits on hold exactly one image of 64 tokens.
    model, processor = llava
    inputs, _ = encode_dialogue(processor, [make_image(64, 64)], QUESTIONS, ["red", "two", "yes"])
    inputs = to_device(inputs, "cpu", torch.float32)
    assert [t.shape[0] for t in adapter_for(model).visual_tokens(inputs)] == [64]
