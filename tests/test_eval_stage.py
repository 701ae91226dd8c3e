"""tasks.evaluate end to end on a tiny LLaVA and a temporary MLflow store: test metrics with
intervals, ceilings, the extra seeds' spread, and data/val with the registry's champion."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from conftest import build_llava
from test_ceilings import _dataset

import mc_registry
from mc_core.compressors import build, checkpoint
from mc_core.data import schema
from mc_core.models import zoo
from tasks import cells, common, lineage, tracking
from tasks import evaluate as stage
from tasks.params import CeilingsParams, EvaluateParams, RegisterParams, TrainParams

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH, RATE = "tiny-llava", 0.75


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    model, processor = build_llava()
    db = tmp_path / "mlflow.db"
    mc_registry.migrate(f"sqlite:///{db}")
    monkeypatch.setenv(mc_registry.ENV_URI, f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(zoo, "load", lambda path: (model, processor))
    monkeypatch.setattr(zoo, "info", lambda path: {"family": "llava"})
    # The base model's folder: the stage hashes it to pick the champion of the same base.
    cells.base_dir(ARCH).mkdir(parents=True)
    (cells.base_dir(ARCH) / "zoo.json").write_text('{"family": "llava"}')
    schema.save(_dataset(3, True), common.DATA_TEST)
    schema.save(_dataset(2, False), common.DATA_VAL)
    ev = EvaluateParams(
        methods=["none", "sample", "metacompress"],
        device="cpu",
        batch_size=2,
        max_new_tokens=1,
        progress=False,
        ceilings=CeilingsParams(oracle_dialogues=1, oracle_steps=2),
    )
    params = SimpleNamespace(
        evaluate=ev,
        register=RegisterParams(),
        train=TrainParams(),
        tracking=SimpleNamespace(experiment="stage"),
    )
    monkeypatch.setattr(common, "load_params", lambda sections, who: params)

    def save(path, seed):
        comp = build("metacompress", rate=RATE, dim=64, d_c=16, seed=seed)
        checkpoint.save_compressor(path, comp, meta={"family": "llava", "seed": seed})

    return save


def _eval() -> dict:
    stage.main(["--arch", ARCH, "--rate", str(RATE)])
    return json.loads(cells.cell_file("eval", ARCH, RATE).read_text())


def test_evaluate_stage_records_ceilings_seeds_and_validation(workspace):
    workspace(cells.compressor_dir(ARCH, RATE), 0)
    workspace(cells.seeds_dir(ARCH, RATE) / "seed-1", 1)
    first = _eval()
    assert first["n_dialogues"] == 3
    mc = first["methods"]["metacompress"]
    assert len(mc["acc_avg_ci"]) == 2 and mc["seeds"]["seeds"] == [0, 1]
    assert mc["seeds"]["acc_avg"][0] == mc["acc_avg"] and len(mc["seeds"]["acc_avg"]) == 2
    # Per-dialogue scores per seed, the first seed's first: comparisons pair across seeds.
    assert mc["seeds"]["acc_dialogues"][0] == mc["acc_dialogues"]
    assert [len(d) for d in mc["seeds"]["acc_dialogues"]] == [3, 3]
    assert {"selector", "oracle", "cls_overlap"} <= set(first["ceilings"])
    val = first["validation"]
    assert val["n_dialogues"] == 2 and set(val["methods"]) == {"metacompress", "sample"}

    # Make v1 the champion (the gate itself is tested in tests/test_gating.py).
    name = RegisterParams().model_name(ARCH, RATE, "metacompress")
    run = tracking.start_cell_run("stage", ARCH, "0.75", params={})
    tracking.register_checkpoint(
        name,
        cells.compressor_dir(ARCH, RATE),
        run_id=run,
        score=0.5,
        metric="acc_avg",
        promote=True,
        tags={"base_sha256": lineage.checkpoint_hash(cells.base_dir(ARCH))},
    )
    again = _eval()  # the champion is this very checkpoint: not evaluated twice
    assert again["validation"]["methods"]["champion"] == {"version": "1", "same_checkpoint": True}
    # A second checkpoint: the registered champion (v1) is re-evaluated on data/val beside it.
    shutil.rmtree(cells.seeds_dir(ARCH, RATE))
    workspace(cells.compressor_dir(ARCH, RATE), 5)
    second = _eval()
    champ = second["validation"]["methods"]["champion"]
    assert champ["version"] == "1" and champ["same_checkpoint"] is False
    assert champ["acc_avg"] == val["methods"]["metacompress"]["acc_avg"]  # same weights
    assert "seeds" not in second["methods"]["metacompress"]
    # The base model changed (a retrained teacher): v1 belongs to other weights, not evaluated.
    (cells.base_dir(ARCH) / "zoo.json").write_text('{"family": "llava", "retrained": true}')
    assert "champion" not in _eval()["validation"]["methods"]


def test_flat_metrics_keep_per_dialogue_scores_out_of_mlflow():
    m = {"acc_turn": [0.5, 1.0], "acc_avg": 0.75, "acc_dialogues": [1.0, 0.5], "prefill_ms": 2}
    flat = stage._flat_metrics({"methods": {"sample": m}, "ceilings": {}})
    assert flat == {
        "eval/sample/acc_turn_1": 0.5,
        "eval/sample/acc_turn_2": 1.0,
        "eval/sample/acc_avg": 0.75,
        "eval/sample/prefill_ms": 2,
    }
    # Accuracy per question type: one metric per type, labels made safe for MLflow keys.
    m["acc_by_type"] = {"yes/no": {"acc": 0.9, "n": 3}, "what (colour)?": {"acc": 0.4, "n": 2}}
    flat = stage._flat_metrics({"methods": {"sample": m}, "ceilings": {}})
    assert flat["eval/sample/acc_by_type/yes/no"] == 0.9
    assert flat["eval/sample/acc_by_type/what _colour__"] == 0.4
    assert not any(k.endswith("/n") for k in flat)


def test_any_rate_seeds_are_scored_at_the_grid_rates(workspace):
    from tasks import evaluate_any

    comp = build("metacompress", rate=RATE, dim=64, d_c=16, seed=1)
    comp.trained_rates = (0.5, 0.9)  # an any-rate checkpoint: it serves 0.5 and 0.75
    checkpoint.save_compressor(
        cells.seeds_dir(ARCH, cells.ANY) / "seed-1", comp, meta={"family": "llava"}
    )
    model, processor = zoo.load(None)
    p = common.load_params((), who="test")
    p.grid = SimpleNamespace(rates=[0.5, RATE])
    p.train = TrainParams(any_rate={"rates": [0.5, 0.9]})
    test = schema.load(common.DATA_TEST)
    first = {"acc_avg": 0.25, "acc_dialogues": [0.0, 0.5, 0.25]}
    rates = {
        "0.5": {"methods": {"metacompress-any": dict(first)}},
        "0.75": {"methods": {"metacompress-any": dict(first)}},
        "0.6": {"methods": {"metacompress-any": dict(first)}},  # a probe rate: not re-scored
    }
    evaluate_any._seeds(p, ARCH, model, processor, test, "llava", rates, "metacompress-any")
    for r in ("0.5", "0.75"):
        seeds = rates[r]["methods"]["metacompress-any"]["seeds"]
        assert seeds["seeds"] == [0, 1] and seeds["acc_avg"][0] == 0.25
        assert seeds["acc_dialogues"][0] == first["acc_dialogues"]
        assert len(seeds["acc_dialogues"][1]) == 3
    assert "seeds" not in rates["0.6"]["methods"]["metacompress-any"]
    # One seed (no extra-seed folder): the entries are left as they are.
    shutil.rmtree(cells.seeds_dir(ARCH, cells.ANY))
    del rates["0.5"]["methods"]["metacompress-any"]["seeds"]
    evaluate_any._seeds(p, ARCH, model, processor, test, "llava", rates, "metacompress-any")
    assert "seeds" not in rates["0.5"]["methods"]["metacompress-any"]
