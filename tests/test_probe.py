"""mc_core.evaluation.probe.question_overlap on a tiny LLaVA: the kept-set overlap across a
dialogue's
questions and the centre recall, against hand-computed values from known attention scores."""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from conftest import build_llava, make_image

from mc_core.data.schema import FEATURES, OPTIONAL_FEATURES
from mc_core.evaluation import probe

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(questions: list[list[str]], centres=None) -> datasets.Dataset:
    features = FEATURES if centres is None else datasets.Features({**FEATURES, **OPTIONAL_FEATURES})
    rows: dict[str, list] = {k: [] for k in features}
    for i, qs in enumerate(questions):
        buf = io.BytesIO()
        make_image(64, 64, seed=500 + i).save(buf, format="PNG")
        for k, v in (("dialogue_id", f"p{i}"), ("source", "synthetic"), ("image_id", f"p{i}")):
            rows[k].append(v)
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["questions"].append(qs)
        rows["answers"].append(["red"] * len(qs))
        rows["answer_sets"].append([["red"]] * len(qs))
        rows["question_types"].append(["colour"] * len(qs))
        rows["targets"].append([""] * len(qs))
        if centres is not None:
            rows["object_centres"].append(centres[i])
    return datasets.Dataset.from_dict(rows, features=features)


QS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]


def test_same_question_overlaps_fully_and_model_runs():
    model, processor = build_llava()
    out = probe.question_overlap(model, processor, _dataset([[QS[0]] * 3] * 2), 0.75, [0, 1])
    for k in (0, 1):
        assert out[k]["overlap"] == pytest.approx(1.0)
        assert out[k]["dialogues"] == 2 and out[k]["centre_recall"] is None
        assert out[k]["chance"] == pytest.approx(0.25)  # m / n = 16 / 64
    with pytest.raises(ValueError, match="two questions"):
        probe.question_overlap(model, processor, _dataset([[QS[0]]]), 0.75, [0])


def test_overlap_and_recall_match_hand_counts(monkeypatch):
    """Scores chosen per prompt: turn 1 keeps tokens 0-15 of 64 (m = 16), turn 2 tokens 8-23,
    turn 3 tokens 0-15: overlaps 8/16 and 16/16 pool to 24/32; centres on tokens 0 and 63 (an
    8 x 8 grid) -> recall 1/2."""
    model, processor = build_llava()
    wanted = [range(0, 16), range(8, 24), range(0, 16)]

    def fake(model, adapter, inputs, *, layer, visual_tokens):
        assert [t.shape[0] for t in visual_tokens] == [64, 64, 64]
        out = []
        for keep in wanted:
            s = torch.zeros(64)
            s[list(keep)] = 1.0 + torch.arange(16, dtype=torch.float32)
            out.append(s)
        return out

    monkeypatch.setattr(probe, "prompt_attention", fake)
    ds = _dataset([QS], centres=[[[0.05, 0.05], [0.95, 0.95]]])
    out = probe.question_overlap(model, processor, ds, 0.75, [2])[2]
    assert out["overlap"] == pytest.approx(6 / 8)
    assert out["centre_recall"] == pytest.approx(0.5)
    assert out["overlap_ci"] == [pytest.approx(0.75), pytest.approx(0.75)]


def test_probe_recall_equals_fastv_centre_mass_in_evaluation():
    """Two code paths, one quantity: the probe's turn-1 centre recall per layer K and the
    `centre_mass` evaluation reports for FastV reading that layer (a selection P keeps a centre
    whole or not at all, so its mass is the recall)."""
    from mc_core.compressors import build
    from mc_core.evaluation.runner import evaluate

    model, processor = build_llava()
    # Centres on distinct tokens of the 8 x 8 grid (the probe counts distinct centre tokens).
    centres = [[[0.2, 0.3], [0.7, 0.6], [0.5, 0.9]], [[0.1, 0.1], [0.9, 0.4]]]
    data = _dataset([QS, QS[::-1]], centres=centres)
    rate = 0.75
    probed = probe.question_overlap(model, processor, data, rate, [0, 1])
    for k in (0, 1):
        fastv = build("fastv", rate=rate, dim=64)
        fastv.layer = k
        report = evaluate(
            model,
            processor,
            data,
            ["fastv"],
            rate,
            compressors={"fastv": fastv},
            device="cpu",
            batch_size=2,
            max_new_tokens=1,
            progress=False,
        )
        mass = report["methods"]["fastv"]["centre_mass"]
        # abs 1e-6: centre_mass sums P in float32, the probe counts sets exactly.
        assert mass == pytest.approx(probed[k]["centre_recall"], abs=1e-6), k
