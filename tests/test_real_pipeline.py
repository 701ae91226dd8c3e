"""A real-family checkpoint through the whole DVC pipeline, offline, in a temporary git repo.

The checkpoint is a Hugging Face snapshot of the LLaVA family (tests/hf_snapshots.py: random
tiny weights, a trained BPE tokenizer, the released chat template and processor), named in
``params.yaml: models:`` either as a local folder (what a user with weights on disk writes) or
as an HF id placed in a fake hub cache under ``HF_HOME``; the data are the GQA fixtures.
``dvc repro`` with ``HF_HUB_OFFLINE=1`` runs every stage (base pins the snapshot by content,
nothing is copied or downloaded), the cell is evaluated and registered with the champion
alias, and a second ``dvc repro`` runs nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_hub import _fake_hub
from test_pipeline_dvc import BIN, ROOT, _env

from tasks import params as config

REPO_ID = "test-org/llava-snap"
COMMIT = "c0ffee" + "0" * 34
GQA = ROOT / "tests" / "fixtures" / "gqa"


def _split() -> dict:
    return {
        "source": "gqa",
        "questions": str(GQA / "testdev_balanced_questions.json"),
        "images": str(GQA / "images"),
        "dialogues": None,
        "seed": 0,
    }


PARAMS = {
    # One cell; the any-rate stages are the tiny pipeline's test (tests/test_pipeline_dvc.py).
    "grid": {"archs": ["snap"], "rates": [0.9], "any_rate_archs": []},
    "models": {"snap": {"source": REPO_ID, "revision": None}},
    "data": {"train": _split(), "val": _split(), "test": _split()},
    "train": {"epochs": 1, "max_steps": 2, "batch_size": 2, "target_batch": 4, "progress": False},
    "evaluate": {
        "methods": ["none", "sample", "metacompress"],
        "max_dialogues": 3,
        "batch_size": 3,
        "progress": False,
        "ceilings": {"oracle_dialogues": 1, "oracle_steps": 2},
    },
    # Random weights answer nothing right, so no compressor can beat sample on data/val: the
    # gate is off and the alias goes to the best-scored version (the gate: test_pipeline_dvc).
    "register": {"gate": False, "name_template": "metacompress-{arch}-r{rate}"},
    "report": {"methods": ["none", "sample", "metacompress"]},
}


def _run(cmd: list[str], repo: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module", params=["folder", "hub"])
def project(request, tmp_path_factory, hf_snapshot):
    tmp = tmp_path_factory.mktemp("real-pipeline")
    repo = tmp / "repo"
    repo.mkdir()
    snapshot = hf_snapshot("llava")
    if request.param == "hub":
        files = {f.name: f.read_bytes() for f in snapshot.iterdir()}
        _fake_hub(tmp / "hf", REPO_ID, COMMIT, files)
        source = REPO_ID
    else:
        source = str(shutil.copytree(snapshot, tmp / "weights" / "llava-snap"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("tasks", "mc_registry", "mc_core"):
        shutil.copytree(
            ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    extra = {**PARAMS, "models": {"snap": {"source": source, "revision": None}}}
    params = config.profile_params("smoke", config.read_yaml(ROOT / "params.yaml"), extra=extra)
    config.dump_yaml(params, repo / "params.yaml")
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/cache/\n")
    env = {
        **_env(repo),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf"),
        "MC_CACHE": str(tmp / "mc-cache"),
    }
    env.pop("HF_HUB_CACHE", None)
    _run(["git", "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "pipeline"], repo, env)
    return repo, env, request.param, source


def _repro(repo: Path, env: dict, *targets: str) -> set[str]:
    out = _run([str(BIN / "dvc"), "repro", *targets], repo, env)
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.mark.pipeline
@pytest.mark.slow
def test_real_checkpoint_runs_every_stage_offline(project):
    import mc_registry

    repo, env, kind, source = project
    stages = {"prepare", "base@snap", "train@snap-0.9"}
    if kind == "hub":
        # Where a hub id differs from a folder: resolving and pinning it (base), loading it
        # from the HF cache offline (train). The stages after train are the folder's.
        assert _repro(repo, env, "train@snap-0.9") == stages
        assert (repo / "models/compressors/snap-r0.9/compressor.json").is_file()
    else:
        stages |= {"evaluate@snap-0.9", "register@snap-0.9", "metrics@snap-0.9", "report"}
        assert _repro(repo, env) == stages

    # base pinned the cached snapshot by content; nothing machine-specific is recorded.
    resolved = json.loads((repo / "models/base/snap/resolved.json").read_text())
    if kind == "hub":
        assert (resolved["kind"], resolved["source"], resolved["revision"]) == (
            "hub",
            REPO_ID,
            COMMIT,
        )
    else:  # a folder is pinned by its files' hashes; its machine path is not recorded
        assert (resolved["kind"], resolved["revision"]) == ("folder", None)
    assert resolved["family"] == "llava" and "model.safetensors" in resolved["files"]
    assert sorted(p.name for p in (repo / "models/base/snap").iterdir()) == [
        "resolved.json",
        "zoo.json",
    ]
    base = json.loads((repo / "reports/base/snap.json").read_text())
    assert (base["arch"], base["family"]) == ("snap", "llava")
    assert (base["source"], base["revision"]) == (resolved["source"], resolved["revision"])
    assert base["n_dialogues"] == 3 and base["chance"] is not None
    assert base["acc_selector_packed_r0.9"] is None  # GQA has no object centres
    for f in ("models/base/snap/resolved.json", "reports/base/snap.json"):
        assert env["HF_HOME"] not in (repo / f).read_text()
        if kind == "folder":
            assert str(Path(source).parent) not in (repo / f).read_text()

    if kind == "hub":
        assert _repro(repo, env, "train@snap-0.9") == set()  # pinned: nothing reruns
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert lock["base@snap"]["params"]["params.yaml"]["models"]["snap"]["source"] == source
        return
    ev = json.loads((repo / "reports/eval/snap-0.9.json").read_text())
    assert set(ev["methods"]) == {"none", "sample", "metacompress"} and ev["dataset"] == "gqa"
    reg = json.loads((repo / "reports/registry/snap-0.9.json").read_text())
    assert reg["name"] == "metacompress-snap-r0.9" and reg["gate"]["reason"]
    c = mc_registry.client(env["MLFLOW_TRACKING_URI"])
    assert str(c.get_registered_model("metacompress-snap-r0.9").aliases.get("champion")) == "1"
    assert "| snap | 0.9 |" in (repo / "reports/summary.md").read_text()

    assert _repro(repo, env) == set()  # nothing changed: nothing runs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["base@snap"]["params"]["params.yaml"]["models"]["snap"]["source"] == source
