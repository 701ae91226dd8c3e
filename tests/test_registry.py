"""The MLflow registry on a temporary SQLite database: versions, alias, lineage, concurrency.

Written through ``tasks.tracking`` (runs, registering), read back through ``mc_registry``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mc_registry
from tasks import lineage, tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """A migrated MLflow SQLite database, built once (migrations take seconds)."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mc_registry.migrate(f"sqlite:///{db}")
    return db


@pytest.fixture
def store(template_db, tmp_path, monkeypatch) -> str:
    """A fresh copy of the template database in tmp_path, used as the tracking URI."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv(mc_registry.ENV_URI, uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _ckpt(path: Path, payload: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "compressor.safetensors").write_bytes(payload.encode())
    (path / "compressor.json").write_text(json.dumps({"method": "metacompress", "p": payload}))
    return path


def _run(store: str, arch="tiny-llava", rate="0.9") -> str:
    return tracking.start_cell_run(
        "exp", arch, rate, params={"lr": 1e-3, "grid": [1, 2]}, tags={"profile": "test"}, uri=store
    )


def test_versions_alias_and_dedup(store, tmp_path):
    run = _run(store)
    a = _ckpt(tmp_path / "a", "weights-a")
    r1 = tracking.register_checkpoint(
        "m-tiny-r0.9",
        a,
        run_id=run,
        score=0.6,
        metric="acc_avg",
        tags={"arch": "tiny-llava", "rate": "0.9"},
        uri=store,
    )
    assert (r1.version, r1.created, r1.champion) == ("1", True, "1")

    # Same bytes again (a DVC re-run, a forced stage): no new version.
    again = tracking.register_checkpoint(
        "m-tiny-r0.9", a, run_id=run, score=0.6, metric="acc_avg", uri=store
    )
    assert (again.version, again.created) == ("1", False)

    # A changed but worse checkpoint: version 2, champion stays on 1.
    b = _ckpt(tmp_path / "b", "weights-b")
    r2 = tracking.register_checkpoint(
        "m-tiny-r0.9", b, run_id=run, score=0.4, metric="acc_avg", uri=store
    )
    assert (r2.version, r2.created, r2.champion) == ("2", True, "1")
    # A better one takes the alias.
    c = _ckpt(tmp_path / "c", "weights-c")
    r3 = tracking.register_checkpoint(
        "m-tiny-r0.9", c, run_id=run, score=0.8, metric="acc_avg", uri=store
    )
    assert (r3.version, r3.champion) == ("3", "3")
    cl = mc_registry.client(store)
    assert str(cl.get_model_version_by_alias("m-tiny-r0.9", "champion").version) == "3"
    assert len(cl.search_model_versions("name = 'm-tiny-r0.9'")) == 3

    # Lower-is-better metrics (KL) pick the smallest score.
    assert tracking.set_champion("m-tiny-r0.9", higher_is_better=False, uri=store) == "2"


def test_lineage_tags_and_download(store, tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n"
        "    - path: data/train\n      md5: abc123.dir\n"
    )
    run = _run(store)
    tracking.log_metrics(run, {"acc": 0.5, "nan": float("nan"), "flag": True}, uri=store)
    steps = tracking.StepLogger(run, flush_every=2, uri=store)
    for s in range(5):
        steps(s, {"loss": 1.0 / (s + 1)})
    steps.flush()
    cl = mc_registry.client(store)
    r = cl.get_run(run)
    assert r.data.tags["arch"] == "tiny-llava" and r.data.tags["rate"] == "0.9"
    assert r.data.tags["dvc.data/train"] == "abc123.dir"
    assert r.data.tags["git_sha"]  # "unknown" outside git: still present
    assert r.data.params["lr"] == "0.001"
    # NaN and booleans are not metrics.
    assert set(r.data.metrics) == {"acc", "train/loss"}
    assert [m.step for m in cl.get_metric_history(run, "train/loss")] == [0, 1, 2, 3, 4]
    assert tracking.find_cell_run("exp", "tiny-llava", "0.9", uri=store) == run
    assert tracking.find_cell_run("exp", "tiny-llava", "0.5", uri=store) is None

    ck = _ckpt(tmp_path / "ck", "payload")
    reg = tracking.register_checkpoint(
        "m", ck, run_id=run, score=1.0, metric="acc_avg", tags={"git_sha": "deadbeef"}, uri=store
    )
    mv = cl.get_model_version("m", reg.version)
    assert mv.tags["ckpt_sha256"] == lineage.checkpoint_hash(ck)
    assert mv.tags["git_sha"] == "deadbeef" and mv.run_id == run
    # Artifacts land under the db's folder (mlartifacts/), not ./mlruns.
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    local = mc_registry.download("models:/m@champion", tmp_path / "dl", uri=store)
    assert (local / "compressor.safetensors").read_bytes() == b"payload"
    assert mc_registry.resolve("models:/m/1", uri=store) == ("m", "1")
    with pytest.raises(ValueError, match="expected models:/"):
        mc_registry.resolve("runs:/abc/x", uri=store)


def test_read_side_names_lists_and_champions(store, tmp_path):
    """What the front-ends read: registered names, URIs, every model with its champion."""
    name = mc_registry.model_name("tiny-llava", 0.9)
    assert name == "metacompress-tiny-llava-r0.9"
    assert mc_registry.model_name("a", 0.5, "x", "{method}/{arch}/{rate}") == "x/a/0.5"
    assert mc_registry.model_uri(name) == f"models:/{name}@champion"
    assert mc_registry.parse_uri(mc_registry.model_uri(name, version=2)) == (name, None, "2")
    with pytest.raises(ValueError, match="must contain"):
        mc_registry.check_template("{method}-{arch}")
    assert mc_registry.registered_models(uri=store) == []
    run = _run(store)
    tracking.log_metrics(run, {"eval/acc_avg": 0.5}, uri=store)
    assert mc_registry.client(store).get_run(run).info.run_name == "train-tiny-llava-r0.9"
    tracking.register_checkpoint(
        name, _ckpt(tmp_path / "a", "a"), run_id=run, score=0.5, metric="acc_avg", uri=store
    )
    tracking.register_checkpoint(
        "gated",
        _ckpt(tmp_path / "b", "b"),
        run_id=run,
        score=0.1,
        metric="kl",
        uri=store,
        promote=False,
    )
    assert mc_registry.current_champion(name, uri=store) == ("1", 0.5)
    assert mc_registry.champion("gated", uri=store) is None
    listed = {r.name: r for r in mc_registry.registered_models(uri=store)}
    assert listed["gated"] == mc_registry.Registered("gated")
    top = listed[name]
    assert (top.version, top.score, top.metric) == ("1", 0.5, "acc_avg")
    assert top.run_metrics["eval/acc_avg"] == 0.5


def test_bad_checkpoint_folder_named(store, tmp_path):
    with pytest.raises(ValueError, match="missing-dir: checkpoint folder not found"):
        lineage.checkpoint_hash(tmp_path / "missing-dir")


@pytest.mark.pipeline
def test_four_cells_register_at_once(store, tmp_path):
    """Four processes (like four DVC cells) register into one SQLite store: nothing is lost."""
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from tasks import tracking
        i = sys.argv[1]
        d = Path(sys.argv[2]) / f"ck{i}"
        d.mkdir()
        (d / "compressor.safetensors").write_bytes(b"w" + i.encode())
        (d / "compressor.json").write_text("{}")
        run = tracking.start_cell_run("exp", "tiny-llava", "0." + i, params={"i": i})
        r = tracking.register_checkpoint(f"cell-{i}", d, run_id=run, score=0.5,
                                         metric="acc_avg")
        r2 = tracking.register_checkpoint("shared", d, run_id=run, score=float(i),
                                          metric="acc_avg")
        print(r.version, r2.version)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, 5)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    cl = mc_registry.client(store)
    for i in range(1, 5):
        assert [str(v.version) for v in cl.search_model_versions(f"name = 'cell-{i}'")] == ["1"]
    shared = cl.search_model_versions("name = 'shared'")
    # Four distinct checkpoints into one name from four processes: versions 1..4, no loss.
    assert sorted(int(v.version) for v in shared) == [1, 2, 3, 4]
    best = max(shared, key=lambda v: float(v.tags["score"]))
    assert str(cl.get_model_version_by_alias("shared", "champion").version) == str(best.version)
    runs = cl.search_runs([cl.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 4


def test_a_new_cell_run_ends_the_one_a_killed_stage_left_running(store):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store)
    killed = tracking.start_cell_run("exp", "tiny-llava", "0.9", params={})  # never ended
    other = tracking.start_cell_run("exp", "tiny-llava", "0.5", params={})  # another cell
    new = tracking.start_cell_run("exp", "tiny-llava", "0.9", params={})
    assert c.get_run(killed).info.status == "KILLED"
    assert c.get_run(other).info.status == "RUNNING"  # not this cell's: left alone
    assert c.get_run(new).info.status == "RUNNING"


def test_cell_run_for_finds_the_training_run_or_records_a_closed_stand_in(store):
    trained = tracking.start_cell_run(
        "exp", "tiny-llava", "0.5", params={}, tags={"ckpt_sha256": "aa"}, uri=store
    )
    assert tracking.cell_run_for("exp", "tiny-llava", "0.5", "aa", uri=store) == trained
    # A checkpoint no run of ours trained (restored from DVC's cache): one closed stand-in.
    stand_in = tracking.cell_run_for("exp", "tiny-llava", "0.5", "bb", uri=store)
    assert stand_in != trained
    r = mc_registry.client(store).get_run(stand_in)
    assert r.info.status == "FINISHED"
    assert r.data.tags["ckpt_sha256"] == "bb" and r.data.tags["restored"] == "true"
    assert r.data.params == {"arch": "tiny-llava", "rate": "0.5"}
    assert tracking.cell_run_for("exp", "tiny-llava", "0.5", "bb", uri=store) == stand_in
