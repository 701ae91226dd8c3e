"""tasks.sensitivity on a tiny LLaVA: FastV per layer K (capped at the LLM's last layer) and
both position modes for sample and the trained compressor."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import datasets
import pytest
from conftest import build_llava, make_image

from mc_core.compressors import build, checkpoint
from mc_core.data import schema
from mc_core.data.schema import FEATURES
from mc_core.models import zoo
from tasks import cells, common, sensitivity
from tasks.params import EvaluateParams

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int) -> datasets.Dataset:
    rows: dict[str, list] = {k: [] for k in FEATURES}
    for i in range(n):
        buf = io.BytesIO()
        make_image(64, 64, seed=400 + i).save(buf, format="PNG")
        for k, v in (("dialogue_id", f"s{i}"), ("source", "synthetic"), ("image_id", f"s{i}")):
            rows[k].append(v)
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["questions"].append(
            ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]
        )
        rows["answers"].append(["red", "two", "yes"])
        rows["answer_sets"].append([["red"], ["two"], ["yes"]])
        rows["question_types"].append(["colour", "count", "exist"])
        rows["targets"].append(["", "", ""])
    return datasets.Dataset.from_dict(rows, features=FEATURES)


@pytest.fixture
def cell(tmp_path, monkeypatch):
    model, processor = build_llava()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(zoo, "load", lambda path: (model, processor))
    monkeypatch.setattr(zoo, "info", lambda path: {"family": "llava"})
    monkeypatch.setattr(schema, "load", lambda path: _dataset(3))
    ev = EvaluateParams(
        methods=["sample"],
        history="model",
        device="cpu",
        batch_size=2,
        max_new_tokens=1,
        seed=0,
        progress=False,
    )
    monkeypatch.setattr(
        common,
        "load_params",
        lambda sections, who: SimpleNamespace(
            evaluate=ev, train=SimpleNamespace(method="metacompress")
        ),
    )
    meta = build("metacompress", rate=0.75, dim=64, d_c=16)
    checkpoint.save_compressor(
        cells.compressor_dir("tiny-llava", 0.75), meta, meta={"family": "llava"}
    )
    return model, tmp_path / "reports/sensitivity/tiny-llava-0.75.json"


def test_sensitivity_layers_and_packed_positions(cell):
    model, path = cell
    sensitivity.main(
        ["--arch", "tiny-llava", "--rate", "0.75", "--dialogues", "2", "--positions", "packed"]
    )
    out = json.loads(path.read_text())
    assert out["n_dialogues"] == 2
    n_layers = model.config.get_text_config().num_hidden_layers
    assert [(v["requested"], v["layer"]) for v in out["layers"].values()] == [
        (k, min(k, n_layers - 1)) for k in (0, 1, 2)
    ]
    for v in out["layers"].values():
        steer = v["question_overlap"]
        assert steer["dialogues"] == 2 and 0.0 <= steer["overlap"] <= 1.0
        assert steer["chance"] == pytest.approx(0.25)  # 16 of 64 tokens kept
    assert set(out["positions"]["packed"]) == {"sample", "metacompress"}
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert out["positions"]["packed"]["sample"]["visual_tokens"] == 16
    for bad in (["--layers", "x"], ["--positions", "diagonal"]):
        with pytest.raises(ValueError, match=bad[0]):
            sensitivity.main(["--arch", "tiny-llava", "--rate", "0.75", *bad])


def test_sensitivity_source_positions(cell):
    _, path = cell
    sensitivity.main(
        [
            "--arch",
            "tiny-llava",
            "--rate",
            "0.75",
            "--dialogues",
            "2",
            "--layers",
            "0",
            "--positions",
            "source",
        ]
    )
    assert set(json.loads(path.read_text())["positions"]) == {"source"}
