"""The registry's gate: a version takes `champion` only if it beats the baseline and the
current champion on data/val (tasks/register.py), on a temporary SQLite MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import mc_registry
from tasks import cells, common, lineage, register, tracking
from tasks.params import RegisterParams


def _val(mc: float, sample: float, champion: dict | None = None) -> dict:
    methods = {
        "metacompress": {"acc_avg": mc, "kl_to_full": 1.0 - mc},
        "sample": {"acc_avg": sample, "kl_to_full": 1.0 - sample},
    }
    if champion is not None:
        methods["champion"] = champion
    return {
        "methods": {"metacompress": {"acc_avg": 0.5, "kl_to_full": 0.5}},
        "validation": {"dataset": "synthetic", "n_dialogues": 8, "methods": methods},
    }


def test_gate_refuses_a_version_below_the_baseline():
    d = register.gate(_val(0.28, 0.32), "metacompress", "acc_avg", "sample", None)
    assert d["promote"] is False and "does not beat sample" in d["reason"]
    assert (d["score"], d["baseline"]) == (0.28, 0.32)


def test_gate_first_version_and_champion_comparisons():
    d = register.gate(_val(0.5, 0.3), "metacompress", "acc_avg", "sample", None)
    assert d["promote"] is True and "no champion yet" in d["reason"]
    # The champion re-evaluated on data/val by tasks.evaluate is what counts, not its tag.
    seen = {"acc_avg": 0.6, "version": "3", "same_checkpoint": False}
    d = register.gate(_val(0.5, 0.3, seen), "metacompress", "acc_avg", "sample", ("3", 0.1))
    assert d["promote"] is False and d["champion"] == 0.6 and "champion v3" in d["reason"]
    d = register.gate(_val(0.7, 0.3, seen), "metacompress", "acc_avg", "sample", ("3", 0.9))
    assert d["promote"] is True and d["champion"] == 0.6
    # The alias moved since evaluation: the holder's recorded score is the bar.
    d = register.gate(_val(0.7, 0.3, seen), "metacompress", "acc_avg", "sample", ("4", 0.8))
    assert d["promote"] is False and "recorded score" in d["reason"]
    d = register.gate(_val(0.9, 0.3, seen), "metacompress", "acc_avg", "sample", ("4", 0.8))
    assert d["promote"] is True and d["champion"] == 0.8
    # ... unless that score was measured on another data/val: no bar, the alias stays.
    d = register.gate(
        _val(0.9, 0.3, seen),
        "metacompress",
        "acc_avg",
        "sample",
        ("4", 0.8),
        champion_val_same=False,
    )
    assert d["promote"] is False and "another data/val" in d["reason"]
    # This very checkpoint already holds the alias: nothing to move.
    same = {"version": "3", "same_checkpoint": True}
    d = register.gate(_val(0.7, 0.3, same), "metacompress", "acc_avg", "sample", ("3", 0.7))
    assert d["promote"] is False and "already is champion" in d["reason"]


def test_gate_lower_is_better_for_kl_and_needs_validation():
    # kl_to_full = 1 - acc here: 0.5 beats sample's 0.7.
    d = register.gate(_val(0.5, 0.3), "metacompress", "kl_to_full", "sample", None)
    assert d["promote"] is True
    with pytest.raises(ValueError, match="validation.methods.metacompress.acc_avg"):
        register.gate({"methods": {}}, "metacompress", "acc_avg", "sample", None)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("mlflow-gate") / "mlflow.db"
    mc_registry.migrate(f"sqlite:///{db}")
    return db


@pytest.fixture
def cell(template_db, tmp_path, monkeypatch):
    """A workspace with a store, params and a cell's files; returns a function that registers
    a checkpoint whose validation scores are given."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv(mc_registry.ENV_URI, uri)
    monkeypatch.chdir(tmp_path)
    params = SimpleNamespace(
        register=RegisterParams(),
        train=SimpleNamespace(method="metacompress"),
        tracking=SimpleNamespace(experiment="gate"),
    )
    monkeypatch.setattr(common, "load_params", lambda sections, who: params)
    arch, rate = "tiny-llava", 0.9

    def run(
        payload: str, mc: float, sample: float, base: str = "teacher-1", seen: bool = True
    ) -> dict:
        # The base model's folder: its content hash scopes which champion competes.
        base_dir = cells.base_dir(arch)
        base_dir.mkdir(parents=True, exist_ok=True)
        (base_dir / "model.safetensors").write_text(base)
        ckpt = cells.compressor_dir(arch, rate)
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
        (ckpt / "compressor.safetensors").write_bytes(payload.encode())
        (ckpt / "compressor.json").write_text("{}")
        name = RegisterParams().model_name(arch, rate, "metacompress")
        base_sha = lineage.checkpoint_hash(base_dir)
        held = mc_registry.current_champion(name, uri=uri, base_sha256=base_sha)
        champion = None
        if held and seen:  # what tasks.evaluate records: the champion re-evaluated on data/val
            champion = {
                "version": held[0],
                "same_checkpoint": False,
                "acc_avg": held[1],
                "kl_to_full": 1.0 - held[1],
            }
        common.write_json(cells.cell_file("eval", arch, rate), _val(mc, sample, champion))
        register.main(["--arch", arch, "--rate", str(rate)])
        return json.loads(cells.cell_file("registry", arch, rate).read_text())

    return run


def test_gated_registration_end_to_end(cell):
    first = cell("w1", mc=0.5, sample=0.3)
    assert (first["version"], first["champion"], first["gate"]["promote"]) == ("1", "1", True)
    # A compressor below sample (the 0.28 Qwen 0.9 case): registered, alias stays, reason kept.
    low = cell("w2", mc=0.28, sample=0.32)
    assert (low["version"], low["champion"], low["created"]) == ("2", "1", True)
    assert "does not beat sample" in low["gate"]["reason"]
    # Beats sample but not the champion on data/val: the alias stays too.
    mid = cell("w3", mc=0.45, sample=0.3)
    assert (mid["version"], mid["champion"]) == ("3", "1")
    assert "champion v1" in mid["gate"]["reason"]
    # Beats both: it takes the alias, and its score tag is the validation score.
    top = cell("w4", mc=0.6, sample=0.3)
    assert (top["version"], top["champion"], top["score"]) == ("4", "4", 0.6)
    tags = mc_registry.version_tags(top["name"], "4")
    assert tags["score_split"] == "val" and float(tags["test_score"]) == 0.5


def test_a_refused_first_version_names_no_champion(cell):
    rec = cell("w1", mc=0.2, sample=0.3)  # below the baseline: no version is champion
    assert (rec["version"], rec["champion"], rec["gate"]["promote"]) == ("1", "", False)
    assert rec["uri"] is None and rec["version_uri"] == f"models:/{rec['name']}/1"
    assert cell("w2", mc=0.5, sample=0.3)["uri"] == f"models:/{rec['name']}@champion"


def test_a_champion_of_another_base_model_does_not_compete(cell):
    assert cell("w1", mc=0.8, sample=0.3)["champion"] == "1"
    # The teacher was retrained: v1's 0.8 was measured on other weights. A version that beats
    # sample on the new base takes the alias although its score is lower, and says why.
    new = cell("w2", mc=0.5, sample=0.3, base="teacher-2")
    assert (new["version"], new["champion"], new["gate"]["promote"]) == ("2", "2", True)
    assert "v1 was trained against another base model" in new["gate"]["reason"]
    tags = mc_registry.version_tags(new["name"], "2")
    assert tags["base_sha256"] != mc_registry.version_tags(new["name"], "1")["base_sha256"]
    # On that same base, v2 is the champion to beat again.
    again = cell("w3", mc=0.45, sample=0.3, base="teacher-2")
    assert again["champion"] == "2" and "champion v2" in again["gate"]["reason"]


def _lock_val(md5: str) -> None:
    # What lineage.dvc_hashes reads: the data/val out of a stage in dvc.lock.
    stages = {"prepare": {"outs": [{"path": "data/val", "md5": md5}]}}
    Path("dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


def test_a_recorded_score_on_another_val_split_is_no_bar(cell):
    _lock_val("val-96")
    assert cell("w1", mc=0.8, sample=0.3)["champion"] == "1"
    # The alias moved after evaluate ran (it saw no champion): v1's recorded 0.8 is the bar
    # while data/val is the split it was measured on ...
    assert cell("w2", mc=0.7, sample=0.3, seen=False)["gate"]["champion"] == 0.8
    # ... and no bar once data/val changed: not compared, the alias stays, the reason says so.
    _lock_val("val-300")
    r = cell("w3", mc=0.9, sample=0.3, seen=False)
    assert (r["version"], r["champion"], r["gate"]["promote"]) == ("3", "1", False)
    assert "from another data/val" in r["gate"]["reason"]


def test_a_champion_without_a_base_model_tag_does_not_compete(cell, tmp_path):
    # Versions registered before base models were recorded carry no base_sha256 tag.
    name = RegisterParams().model_name("tiny-llava", 0.9, "metacompress")
    run = tracking.start_cell_run("gate", "tiny-llava", "0.9", params={})
    old = tmp_path / "old"
    old.mkdir()
    (old / "compressor.safetensors").write_text("old")
    tracking.register_checkpoint(name, old, run_id=run, score=0.9, metric="acc_avg", promote=True)
    new = cell("w1", mc=0.5, sample=0.3)
    assert new["champion"] == new["version"] == "2"
    assert "champion v1 records no base model: not compared" in new["gate"]["reason"]


def test_register_checkpoint_promote_flag(cell, tmp_path):
    uri = mc_registry.tracking_uri()
    run = tracking.start_cell_run("gate", "tiny-llava", "0.9", params={}, uri=uri)

    def ck(payload: str) -> Path:
        d = tmp_path / payload
        d.mkdir()
        (d / "compressor.safetensors").write_bytes(payload.encode())
        return d

    # promote=False on a model without a champion: registered, no alias anywhere.
    r1 = tracking.register_checkpoint(
        "m", ck("a"), run_id=run, score=0.9, metric="acc_avg", promote=False, uri=uri
    )
    assert (r1.version, r1.champion) == ("1", "") and mc_registry.current_champion("m") is None
    r2 = tracking.register_checkpoint(
        "m", ck("b"), run_id=run, score=0.1, metric="acc_avg", promote=True, uri=uri
    )
    assert r2.champion == "2" and mc_registry.current_champion("m") == ("2", 0.1)
    # promote=False leaves the alias on v2 even though v3 scores higher.
    r3 = tracking.register_checkpoint(
        "m", ck("c"), run_id=run, score=0.8, metric="acc_avg", promote=False, uri=uri
    )
    assert r3.champion == "2"


def test_a_rerun_on_the_champion_checkpoint_says_so(cell):
    first = cell("w1", mc=0.6, sample=0.3)
    # The same checkpoint registered again (a register rerun): whatever the eval report saw,
    # the registry knows this very checkpoint holds the alias.
    again = cell("w1", mc=0.6, sample=0.3)
    assert (again["version"], again["champion"], again["created"]) == ("1", "1", False)
    assert first["champion"] == "1"
    assert again["gate"]["reason"] == "this checkpoint already is champion v1"
