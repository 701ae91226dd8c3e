"""The train-all flow under Prefect's test harness, on a real DVC project with stand-in stages.

The stand-in stages (``tasks/fake_stage.py`` in a temporary checkout) have the real stage names
and DAG shape (matrix over params.yaml's grid) but each only sleeps briefly and writes its outs,
so these tests exercise the orchestration itself: ordering, fan-out, re-runs that DVC skips,
cell selection, lock retries, failure without retry, the smoke workspace and the Dask runner.
The real stages run in tests/test_pipeline_dvc.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows import dag
from flows import train_all as ta
from flows import workspace as ws
from tasks import cells

ROOT = Path(__file__).resolve().parents[1]

FAKE_STAGE = textwrap.dedent('''
    """Stand-in for a stage: log start/end, sleep, write the declared out (register: a registry
    record's fields but no ckpt_sha256, so the flow has no version to verify; report: markdown)."""
    import fcntl, json, os, sys, time
    from pathlib import Path
    kind, key, out = sys.argv[1:4]
    def note(ev):
        with open("stage-log.txt", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(f"{time.time():.4f} {ev} {kind}@{key}\\n")
    note("start")
    time.sleep(0.2)
    if os.environ.get("FAIL_STAGE") == f"{kind}@{key}":
        sys.exit(3)
    p = Path(out)
    if kind in ("prepare", "base", "train"):
        p.mkdir(parents=True, exist_ok=True)
        (p / "w.txt").write_text(key)
    elif kind == "register":  # rate 0.9 fails its gate and its model has no champion
        arch, rate = key.rsplit("-", 1)
        name, held = f"metacompress-{arch}-r{rate}", "" if rate == "0.9" else "1"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({
            "stage": kind, "key": key, "name": name, "version": "1", "created": True,
            "champion": held, "run_id": "run" + rate.replace(".", ""), "score": 0.5,
            "metric": "acc_avg", "uri": f"models:/{name}@champion",
            "gate": {"promote": bool(held), "reason": "beats sample" if held else "below | sample"},
        }))
    elif kind == "report":
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("# Summary\\n\\n| arch | rate |\\n|---|---|\\n| tiny-llava | 0.5 |\\n")
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"stage": kind, "key": key}))
    note("end")
''')

FAKE_DVC = textwrap.dedent("""
    stages:
      prepare:
        cmd: python tasks/fake_stage.py prepare all data/train
        deps:
          - tasks/fake_stage.py
        params:
          - data
        outs:
          - data/train
      base:
        matrix:
          arch: ${grid.archs}
        cmd: python tasks/fake_stage.py base ${item.arch} models/base/${item.arch}
        deps:
          - data/train
        outs:
          - models/base/${item.arch}
      train:
        matrix:
          arch: ${grid.archs}
          rate: ${grid.rates}
        cmd: python tasks/fake_stage.py train ${item.arch}-${item.rate} m/${item.arch}-${item.rate}
        deps:
          - models/base/${item.arch}
        params:
          - train
        outs:
          - m/${item.arch}-${item.rate}
      evaluate:
        matrix:
          arch: ${grid.archs}
          rate: ${grid.rates}
        cmd: >-
          python tasks/fake_stage.py evaluate ${item.arch}-${item.rate}
          reports/eval/${item.arch}-${item.rate}.json
        deps:
          - m/${item.arch}-${item.rate}
        metrics:
          - reports/eval/${item.arch}-${item.rate}.json:
              cache: false
      register:
        matrix:
          arch: ${grid.archs}
          rate: ${grid.rates}
        cmd: >-
          python tasks/fake_stage.py register ${item.arch}-${item.rate}
          reports/registry/${item.arch}-${item.rate}.json
        deps:
          - reports/eval/${item.arch}-${item.rate}.json
        outs:
          - reports/registry/${item.arch}-${item.rate}.json:
              cache: false
      report:
        cmd: python tasks/fake_stage.py report all reports/summary.md
        deps:
          - reports/registry
        outs:
          - reports/summary.md:
              cache: false
""")


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def checkout(tmp_path, monkeypatch, template_db) -> Path:
    """A temporary checkout: real params.yaml (grid tiny-llava x 0.5, 0.9), stand-in stages."""
    root = tmp_path / "checkout"
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / "fake_stage.py").write_text(FAKE_STAGE)
    (root / "dvc.yaml").write_text(FAKE_DVC)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["grid"] = {"archs": ["tiny-llava"], "rates": [0.5, 0.9]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True
    )
    shutil.copy(template_db, root / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("FAIL_STAGE", raising=False)
    return root


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    import mc_registry

    db = tmp_path_factory.mktemp("flow-mlflow") / "mlflow.db"
    mc_registry.migrate(f"sqlite:///{db}")
    return db


def _log(path: Path) -> list[tuple[float, str, str]]:
    f = path / "stage-log.txt"
    if not f.exists():
        return []
    rows = [line.split() for line in f.read_text().splitlines()]
    return [(float(t), ev, st) for t, ev, st in rows]


def _time(log, ev: str, stage: str) -> float:
    return next(t for t, e, s in log if e == ev and s == stage)


def test_grouping_and_selection():
    names = [
        "prepare",
        "base@a",
        "train@a-0.5",
        "evaluate@a-0.5",
        "register@a-0.5",
        "train@a-0.9",
        "evaluate@a-0.9",
        "register@a-0.9",
        "report",
    ]
    groups = ws.by_kind(names)
    assert groups["train"] == ["train@a-0.5", "train@a-0.9"] and groups["report"] == ["report"]
    kinds = dag.kinds_of(yaml.safe_load(FAKE_DVC))
    assert ws.cell_keys(groups, kinds) == ["a-0.5", "a-0.9"]
    from tasks.params import GridParams

    grid = GridParams.model_construct(archs=["a"], rates=[0.5, 0.9])
    assert ws.select_cells(["a-0.5", "a-0.9"], grid, None, [0.9]) == ["a-0.9"]
    with pytest.raises(ValueError, match=r"rates: 0.7 is not in grid.rates=\[0.5, 0.9\]"):
        ws.select_cells(["a-0.5"], grid, None, [0.7])
    with pytest.raises(ValueError, match="archs: 'b' is not in grid.archs"):
        ws.select_cells(["a-0.5"], grid, ["b"], None)
    assert cells.arch_of("tiny-llava-next-0.75") == "tiny-llava-next"


def test_stage_kinds_and_order_come_from_dvc_yaml():
    kinds = dag.kinds_of(yaml.safe_load(FAKE_DVC))
    assert [(k.name, k.fanout) for k in kinds] == [
        ("prepare", "shared"),
        ("base", "arch"),
        ("train", "cell"),
        ("evaluate", "cell"),
        ("register", "cell"),
        ("report", "shared"),
    ]
    by = {k.name: k for k in kinds}
    assert by["evaluate"].after == {"train"} and by["report"].after == {"register"}
    assert dag.downstream_of_cells(kinds) == {"report"}
    assert dag.writer_of(yaml.safe_load(FAKE_DVC), "reports/registry") == "register"
    # A new per-cell stage declared first in the file still runs after what it reads, and a
    # new shared stage that reads it lands after the cells: no flow code names either.
    doc = yaml.safe_load(FAKE_DVC)
    doc["stages"] = {
        "probe": {
            "matrix": {"arch": "${grid.archs}", "rate": "${grid.rates}"},
            "cmd": "x",
            "deps": ["reports/eval/${item.arch}-${item.rate}.json"],
            "outs": ["probe/${item.arch}-${item.rate}"],
        },
        "digest": {"cmd": "y", "deps": ["probe"], "outs": ["digest.md"]},
        **doc["stages"],
    }
    order = [k.name for k in dag.kinds_of(doc)]
    assert order.index("probe") > order.index("evaluate")
    assert dag.downstream_of_cells(dag.kinds_of(doc)) == {"report", "digest"}
    doc["stages"]["train"]["deps"].append("digest.md")
    with pytest.raises(ValueError, match="cycle"):
        dag.kinds_of(doc)
    with pytest.raises(ValueError, match=r"stages.x.matrix over \['seed'\]"):
        dag.kinds_of({"stages": {"x": {"cmd": "z", "matrix": {"seed": [1]}}}})
    # The real pipeline: prepare and base upstream, the cell chain in order, report last.
    real = dag.kinds(ROOT / "dvc.yaml")
    cell = [k.name for k in real if k.fanout == "cell"]
    assert cell.index("train") < cell.index("evaluate") < cell.index("register")
    assert "report" in dag.downstream_of_cells(real)


@pytest.mark.pipeline
def test_flow_orders_fans_out_and_reruns_nothing(harness, checkout):
    out = ta.train_all(profile="default", checkout=str(checkout))
    log = _log(checkout)
    cells = ["tiny-llava-0.5", "tiny-llava-0.9"]
    assert set(out["registry"]) == set(cells)
    assert all(r["stage"] == "register" and r["key"] == k for k, r in out["registry"].items())
    assert out["stages"][0] == "prepare" and out["stages"][-1] == "report"
    # Shared upstream first, then each cell's chain in order, report last.
    assert _time(log, "end", "prepare@all") <= _time(log, "start", "base@tiny-llava")
    for k in cells:
        assert _time(log, "end", "base@tiny-llava") <= _time(log, "start", f"train@{k}")
        assert _time(log, "end", f"train@{k}") <= _time(log, "start", f"evaluate@{k}")
        assert _time(log, "end", f"evaluate@{k}") <= _time(log, "start", f"register@{k}")
        assert _time(log, "end", f"register@{k}") <= _time(log, "start", "report@all")
    assert len([1 for _, e, _ in log if e == "start"]) == 9  # every stage exactly once

    # DVC recorded every stage: nothing is stale afterwards (a re-run would run nothing).
    status = ws.dvc(["status", "--quiet"], checkout)
    assert status.returncode == 0, status.stdout + status.stderr


@pytest.mark.pipeline
def test_flow_subset_failure_and_bad_params(harness, checkout, monkeypatch):
    out = ta.train_all(profile="default", rates=[0.9], checkout=str(checkout))
    assert list(out["registry"]) == ["tiny-llava-0.9"]
    assert "report" not in out["stages"]  # not every cell was selected
    ran = {s for _, e, s in _log(checkout) if e == "start"}
    assert "train@tiny-llava-0.5" not in ran and "train@tiny-llava-0.9" in ran

    # A failing stage fails the flow at once (no lock error: no retry).
    monkeypatch.setenv("FAIL_STAGE", "train@tiny-llava-0.5")
    with pytest.raises(ws.DvcStageError, match="train@tiny-llava-0.5 failed"):
        ta.train_all(profile="default", checkout=str(checkout))
    starts = [s for _, e, s in _log(checkout) if e == "start"]
    assert starts.count("train@tiny-llava-0.5") == 1

    # A bad param fails before any stage runs, naming the key.
    n = len(_log(checkout))
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["grid"]["rates"] = [0.5, 1.5]
    (checkout / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"grid\.rates\[1\]=1\.5: rate must be in \(0, 1\)"):
        ta.train_all(profile="default", checkout=str(checkout))
    assert len(_log(checkout)) == n


@pytest.mark.pipeline
def test_lock_conflict_is_retried(harness, checkout):
    import zc.lockfile
    from prefect import flow

    lock_path = checkout / ".dvc" / "tmp" / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    held = zc.lockfile.LockFile(str(lock_path))
    # DVC itself retries for about 3 s; hold the lock longer so the task sees a lock error.
    threading.Timer(5.0, held.close).start()

    @flow
    def one_stage():
        return ta.run_stage("prepare", str(checkout), str(checkout))

    t0 = time.perf_counter()
    one_stage()
    assert time.perf_counter() - t0 >= 5.0
    assert [s for _, e, s in _log(checkout) if e == "end"] == ["prepare@all"]


@pytest.mark.pipeline
def test_smoke_profile_workspace_and_dask(harness, checkout):
    out = ta.train_all_dask(profile="smoke", rates=[0.9], checkout=str(checkout))
    smoke = checkout / "runs" / "smoke"
    assert Path(out["workspace"]) == smoke
    # The selected cell and the arch's any-rate compressor (smoke's grid.any_rate_archs).
    assert list(out["registry"]) == ["tiny-llava-0.9", "tiny-llava-any"]
    params = yaml.safe_load((smoke / "params.yaml").read_text())
    assert params["train"]["max_steps"] == 120
    assert params["tracking"]["experiment"].endswith("smoke")
    # The default workspace is untouched by the smoke run.
    assert not (checkout / "stage-log.txt").exists()
    assert (checkout / "runs" / ".gitignore").read_text() == "*\n"
    assert "no_scm = true" in (smoke / ".dvc" / "config").read_text()
    assert os.path.exists(smoke / "dvc.lock")


def _artifacts(flow_run_id) -> dict:
    """The artifacts of one flow run, by key, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


@pytest.mark.pipeline
def test_flow_publishes_artifacts(harness, checkout, monkeypatch):
    from flows import artifacts as fa

    state = ta.train_all(profile="default", checkout=str(checkout), return_state=True)
    assert state.is_completed()
    arts = _artifacts(state.state_details.flow_run_id)
    # A sqlite store: summary and registry, no link (the registry says how to browse the store).
    assert set(arts) == {fa.SUMMARY_KEY, fa.REGISTRY_KEY, fa.TABLE_KEY}
    summary = arts[fa.SUMMARY_KEY]
    assert summary.type == "markdown"
    assert summary.data == (checkout / "reports" / "summary.md").read_text()
    assert "| tiny-llava | 0.5 |" in summary.data
    md = arts[fa.REGISTRY_KEY].data
    assert "`models:/metacompress-tiny-llava-r0.5@champion`" in md
    assert "metacompress-tiny-llava-r0.9@champion" not in md and "no champion" in md
    assert f"mlflow ui --backend-store-uri sqlite:///{checkout / 'mlflow.db'}" in md
    assert "](" not in md
    rows = {r["cell"]: r for r in json.loads(arts[fa.TABLE_KEY].data)}
    assert arts[fa.TABLE_KEY].type == "table" and set(rows) == {"tiny-llava-0.5", "tiny-llava-0.9"}
    assert rows["tiny-llava-0.9"]["champion"] == "no champion"
    assert rows["tiny-llava-0.9"]["decision"] == "not promoted"
    assert rows["tiny-llava-0.5"]["champion"] == "v1" and rows["tiny-llava-0.5"]["run_url"] == ""

    # An MLflow server: links to it. A subset (no report, so no summary), and one artifact that
    # cannot be created: logged, the others published, the flow completes.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@127.0.0.1:5999/")
    monkeypatch.setattr(ta.mc_registry, "migrate", lambda uri=None: uri)  # no server to migrate

    def down(**kwargs):
        raise RuntimeError("artifact API down")

    monkeypatch.setattr(fa.pa, "create_table_artifact", down)
    state = ta.train_all(profile="default", rates=[0.9], checkout=str(checkout), return_state=True)
    assert state.is_completed()
    arts = _artifacts(state.state_details.flow_run_id)
    assert set(arts) == {fa.REGISTRY_KEY, fa.MLFLOW_KEY}
    assert arts[fa.MLFLOW_KEY].data == "[MLflow UI](http://127.0.0.1:5999)"
    md = arts[fa.REGISTRY_KEY].data
    assert "(http://127.0.0.1:5999/#/runs/run09)" in md
    assert "(http://127.0.0.1:5999/#/models/metacompress-tiny-llava-r0.9/versions/1)" in md
    assert "no champion" in md and "@champion" not in md and "secret" not in md

    # Publishing itself fails (a bug in formatting): still only logged.
    monkeypatch.setattr(ta.artifacts, "publish", lambda *a, **k: 1 / 0)
    state = ta.train_all(profile="default", rates=[0.9], checkout=str(checkout), return_state=True)
    assert state.is_completed() and state.result()["registry"]["tiny-llava-0.9"]["version"] == "1"
    assert _artifacts(state.state_details.flow_run_id) == {}


def test_registered_detects_a_reset_store(tmp_path, monkeypatch, template_db):
    """A registry record whose version is missing from the store triggers re-registration."""
    from tasks import tracking

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "compressor.safetensors").write_bytes(b"w")
    run = tracking.start_cell_run("e", "a", "0.5", params={})
    reg = tracking.register_checkpoint("m", ck, run_id=run, score=1.0, metric="acc_avg")
    rec = tmp_path / "reports" / "registry" / "a-0.5.json"
    rec.parent.mkdir(parents=True)
    rec.write_text(json.dumps(reg.to_dict()))
    assert ta.registered(str(tmp_path), "a-0.5")
    assert not ta.registered(str(tmp_path), "a-0.9")  # no record at all
    shutil.copy(template_db, db)  # the store is reset: the version is gone
    assert not ta.registered(str(tmp_path), "a-0.5")
