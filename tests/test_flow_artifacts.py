"""The train-all flow's run-page artifacts (flows/artifacts.py): formatting, no Prefect server.

That a flow run publishes them, read back through the Prefect API, is in tests/test_flow.py
(``test_flow_publishes_artifacts``).
"""

from __future__ import annotations

import json
import logging

import pytest

from flows import artifacts as fa

SQLITE = "sqlite:////srv/mc/mlflow.db"
HTTP = "http://127.0.0.1:5000/"

# A record as tasks/register.py writes it: this checkpoint is the champion.
CHAMPION = {
    "name": "metacompress-tiny-llava-r0.5",
    "version": "3",
    "created": False,
    "champion": "3",
    "ckpt_sha256": "ab" * 32,
    "run_id": "1bc1f3a0fbae4b72a44b2439031ace8f",
    "score": 0.8944444444444445,
    "metric": "acc_avg",
    "uri": "models:/metacompress-tiny-llava-r0.5@champion",
    "gate": {"promote": False, "reason": "this checkpoint already is champion v3"},
}
# A version that failed its gate, of a model with no champion at all (the record's "uri" still
# says @champion: the artifact must not repeat it).
NONE_HELD = {
    **CHAMPION,
    "name": "metacompress-tiny-llava-r0.9",
    "version": "1",
    "created": True,
    "champion": "",
    "run_id": "ffee",
    "uri": "models:/metacompress-tiny-llava-r0.9@champion",
    "gate": {"promote": False, "reason": "does not beat sample | 0.41"},
}
RECORDS = {"tiny-llava-0.5": CHAMPION, "tiny-llava-0.9": NONE_HELD, "tiny-llava-0.75": None}


def test_keys_are_valid_prefect_keys():
    for key in (fa.SUMMARY_KEY, fa.REGISTRY_KEY, fa.TABLE_KEY, fa.MLFLOW_KEY):
        assert fa.KEY.fullmatch(key), key


@pytest.mark.parametrize(
    "uri, ui",
    [
        ("http://127.0.0.1:5000/", "http://127.0.0.1:5000"),
        ("https://user:secret@mlflow.lab:8443/mlflow/?x=1#y", "https://mlflow.lab:8443/mlflow"),
        ("http://[::1]:5000", "http://[::1]:5000"),
        (SQLITE, None),
        ("file:///srv/mlruns", None),
        ("databricks", None),
    ],
)
def test_ui_url_only_for_http_servers(uri, ui):
    assert fa.ui_url(uri) == ui


def test_no_champion_never_gives_a_champion_uri():
    assert fa.champion_of(NONE_HELD) == "no champion" == fa.champion_uri(NONE_HELD)
    assert fa.champion_of(CHAMPION) == "v3"
    assert fa.champion_uri(CHAMPION) == "models:/metacompress-tiny-llava-r0.5@champion"
    for uri in (SQLITE, HTTP):
        md = fa.registry_markdown({"tiny-llava-0.9": NONE_HELD}, uri)
        assert "no champion" in md and "@champion" not in md
        (row,) = fa.registry_rows({"tiny-llava-0.9": NONE_HELD}, uri)
        assert row["champion"] == row["champion_uri"] == "no champion"
        assert row["version_uri"] == "models:/metacompress-tiny-llava-r0.9/1"


def test_decisions():
    assert fa.decision_of(CHAMPION) == "not promoted"
    assert fa.decision_of({"gate": {"promote": True}}) == "promoted"
    assert fa.decision_of({"gate": {"promote": None, "reason": "ungated"}}) == "ungated"
    assert fa.decision_of({}) == "-"


def test_registry_links_to_an_mlflow_server():
    md = fa.registry_markdown(RECORDS, "http://u:pw@mlflow.lab:5000/")
    ui = "http://mlflow.lab:5000"
    assert f"[`models:/metacompress-tiny-llava-r0.5/3`]({ui}/#/models/" in md
    assert f"({ui}/#/models/metacompress-tiny-llava-r0.5/versions/3)" in md
    assert (
        f"[`1bc1f3a0fbae4b72a44b2439031ace8f`]({ui}/#/runs/1bc1f3a0fbae4b72a44b2439031ace8f)" in md
    )
    assert f"MLflow UI: [{ui}]({ui})" in md and "pw" not in md
    assert "does not beat sample \\| 0.41" in md  # a pipe in a reason stays inside its cell
    assert "| tiny-llava-0.75 | no registry record |" in md
    assert "r0.9/versions/1) (new)" in md and "r0.5/versions/3) (new)" not in md
    rows = {r["cell"]: r for r in fa.registry_rows(RECORDS, HTTP)}
    assert rows["tiny-llava-0.5"]["run_url"] == f"{HTTP.rstrip('/')}/#/runs/{CHAMPION['run_id']}"
    assert rows["tiny-llava-0.75"]["model"] == "no registry record"
    assert fa.registry_rows({"a-0.5": {"stage": "register"}}, HTTP)[0]["model"] == (
        "not a registry record"
    )


def test_registry_on_sqlite_gives_the_mlflow_ui_hint():
    md = fa.registry_markdown(RECORDS, SQLITE)
    assert "](" not in md  # nothing to link to
    assert f"`mlflow ui --backend-store-uri {SQLITE}`" in md
    assert "`models:/metacompress-tiny-llava-r0.5@champion`" in md
    assert all(r["run_url"] == r["version_url"] == "" for r in fa.registry_rows(RECORDS, SQLITE))
    json.dumps(fa.registry_rows(RECORDS, SQLITE))  # a table artifact's rows are plain JSON


def test_publish_creates_each_artifact_and_logs_failures(monkeypatch, caplog):
    made: dict[str, dict] = {}

    def fake(kind):
        def create(key, **kwargs):
            if key == fa.TABLE_KEY:
                raise RuntimeError("API down")
            made[key] = {"kind": kind, **kwargs}

        return create

    for kind in ("markdown", "table", "link"):
        monkeypatch.setattr(fa.pa, f"create_{kind}_artifact", fake(kind))
    log = logging.getLogger("test-flow-artifacts")
    with caplog.at_level(logging.WARNING, logger=log.name):
        done = fa.publish(RECORDS, HTTP, summary="# S\n", where="runs/smoke", logger=log)
    assert done == [fa.SUMMARY_KEY, fa.REGISTRY_KEY, fa.MLFLOW_KEY]
    assert "train-all-registry-table not published" in caplog.text and "API down" in caplog.text
    assert made[fa.SUMMARY_KEY] == {
        "kind": "markdown",
        "markdown": "# S\n",
        "description": "reports/summary.md (runs/smoke)",
    }
    assert made[fa.MLFLOW_KEY]["link"] == "http://127.0.0.1:5000"
    # sqlite, no summary (the report did not run): only the registry.
    made.clear()
    assert fa.publish(RECORDS, SQLITE) == [fa.REGISTRY_KEY]
    assert "mlflow ui --backend-store-uri" in made[fa.REGISTRY_KEY]["markdown"]
