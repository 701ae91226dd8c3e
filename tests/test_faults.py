"""The fault-injection suite (reliability/), CI-sized: one trial of a representative subset.

One reference workspace (a git + DVC project of the pipeline, shrunk: reliability.workspace)
runs ``dvc repro`` once; each trial works on a copy of it. The subset covers every kind of
fault: a kill -9 of the train stage after its first checkpoint (resume, identical outputs),
a disk full while saving the checkpoint, the tracking server down at registration, wrong
types in params.yaml, a truncated image among good ones, four registrations at once, the
unpickling scan. The full suite and counts are ``python -m reliability``
(reports/reliability.json).
"""

from __future__ import annotations

import json

import pytest

from reliability import core, load_all

load_all()

# (fault, trial index): the kill trial with an odd index waits for a checkpoint first, so the
# rerun must resume from it.
CI = [
    ("kill-train", 1),
    ("disk-full-checkpoint", 0),
    ("mlflow-down-register", 0),
    ("params-wrong-types", 0),
    ("image-truncated", 0),
    ("four-registrations", 0),
    ("no-unpickling", 0),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> core.Context:
    # force=[]: no second forced run of the stages (their timings only aim random kills); one
    # rate: a cell fewer to run (the faults here touch the first cell only).
    return core.Context(
        tmp_path_factory.mktemp("faults"), force=[], extra={"grid": {"rates": [0.5]}}
    )


def test_registry_covers_the_issue():
    """The suite has >= 20 faults of >= 5 kinds, each stage killed, every kind present."""
    kinds = {f.kind for f in core.FAULTS.values()}
    assert len(core.FAULTS) >= 20 and kinds == set(core.KINDS)
    for stage in ("prepare", "base", "train", "evaluate", "register"):
        assert f"kill-{stage}" in core.FAULTS
    assert {n for n, _ in CI} <= set(core.FAULTS)
    assert {core.FAULTS[n].kind for n, _ in CI} >= {
        "kill",
        "disk",
        "outage",
        "corrupt",
        "bad-input",
        "concurrency",
        "security",
    }


@pytest.mark.pipeline
@pytest.mark.slow
@pytest.mark.parametrize("name, trial", CI, ids=[n for n, _ in CI])
def test_fault_survives(ctx, name, trial):
    res = core.run_trial(ctx, name, trial)
    assert not res.lost, res.how
    assert res.survived, res.how
    if name == "kill-train":
        assert "identical" in res.how, res.how
        # The kill lands on wall-clock timing: when training already finished (its state is
        # deleted at the end) there is nothing to resume; when a checkpoint was left, the rerun
        # must have resumed from it.
        if "; left " in res.how:
            assert "(resumed)" in res.how, res.how


def test_report_schema(tmp_path):
    """reliability.json has the issue's schema and the markdown table one row per fault."""
    record = {
        "faults": [
            {
                "name": "a",
                "kind": "kill",
                "tried": 2,
                "survived": 2,
                "lost": 0,
                "how": "x | y",
                "trials": ["t1", "t2"],
            }
        ],
        "seed": 0,
        "config": {"arch": "tiny-llava", "rates": [0.5], "params": "p"},
    }
    j, m = core.write_reports(record, tmp_path)
    back = json.loads(j.read_text())
    assert set(back["faults"][0]) >= {"name", "kind", "tried", "survived", "lost", "how"}
    table = [ln for ln in m.read_text().splitlines() if ln.startswith("| a |")]
    assert table == ["| a | kill | 2 | 2 | 0 | x \\| y |"]
    merged = core.merge(record, {**record, "faults": [{**record["faults"][0], "tried": 3}]})
    assert [r["tried"] for r in merged["faults"]] == [3]
