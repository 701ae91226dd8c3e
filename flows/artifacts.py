"""The train-all flow's results on its Prefect run page: the summary and the registry decisions.

Views only: the files the stages write (``reports/summary.md``, ``reports/registry/<cell>.json``)
are the source of truth. :func:`publish` creates the artifacts through Prefect's own API and logs,
never raises, when one cannot be created. Keys (lowercase letters, digits and dashes):

- ``train-all-summary`` (markdown): ``reports/summary.md`` as the report stage wrote it.
- ``train-all-registry`` (markdown): one row per cell: the registered version, the champion
  (``no champion`` where the model has none), the gate's decision and reason, the cell's MLflow
  run; linked to the MLflow UI where the tracking URI is an http(s) server, else the
  ``mlflow ui`` command that browses the store.
- ``train-all-registry-table`` (table): the same rows as plain values.
- ``train-all-mlflow`` (link): the MLflow UI, only for an http(s) tracking server.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from prefect import artifacts as pa

SUMMARY_KEY = "train-all-summary"
REGISTRY_KEY = "train-all-registry"
TABLE_KEY = "train-all-registry-table"
MLFLOW_KEY = "train-all-mlflow"
KEY = re.compile(r"[a-z0-9-]+")
NO_CHAMPION = "no champion"


def ui_url(uri: str) -> str | None:
    """The MLflow UI of an http(s) tracking URI (credentials, query and fragment dropped), else
    None (a sqlite or file store has no UI of its own)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def ui_hint(uri: str) -> str:
    """The command that browses a store without a server (a sqlite URI)."""
    return f"mlflow ui --backend-store-uri {uri}"


def run_url(ui: str, run_id: str) -> str:
    """The MLflow UI page of run ``run_id`` (MLflow finds its experiment)."""
    return f"{ui}/#/runs/{quote(run_id, safe='')}"


def version_url(ui: str, name: str, version: str) -> str:
    """The MLflow UI page of version ``version`` of registered model ``name``."""
    return f"{ui}/#/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}"


def champion_of(rec: dict[str, Any]) -> str:
    """``v<n>`` of the model's champion, or ``no champion`` (the record's champion is empty)."""
    held = str(rec.get("champion") or "")
    return f"v{held}" if held else NO_CHAMPION


def champion_uri(rec: dict[str, Any]) -> str:
    """``models:/<name>@champion`` only where the model has a champion, else ``no champion``."""
    if not rec.get("champion") or not rec.get("name"):
        return NO_CHAMPION
    return f"models:/{rec['name']}@champion"


def decision_of(rec: dict[str, Any]) -> str:
    """The gate's decision: ``promoted``, ``not promoted``, ``ungated`` (or ``-``: no gate)."""
    gate = rec.get("gate")
    if not isinstance(gate, dict):
        return "-"
    promote = gate.get("promote")
    return "ungated" if promote is None else "promoted" if promote else "not promoted"


def registry_rows(records: dict[str, dict[str, Any] | None], uri: str) -> list[dict[str, Any]]:
    """One plain row per cell (``None``: the cell has no registry record yet)."""
    ui = ui_url(uri)
    rows = []
    for cell, found in records.items():
        rec = found if isinstance(found, dict) else {}
        name, version, run_id = rec.get("name", ""), str(rec.get("version", "")), rec.get("run_id")
        missing = "no registry record" if found is None else "not a registry record"
        gate = rec.get("gate") if isinstance(rec.get("gate"), dict) else {}
        rows.append(
            {
                "cell": cell,
                "model": name or missing,
                "version": version,
                "new_version": rec.get("created"),
                "version_uri": f"models:/{name}/{version}" if name and version else "",
                "champion": champion_of(rec) if name else "",
                "champion_uri": champion_uri(rec) if name else "",
                "decision": decision_of(rec),
                "reason": str(gate.get("reason", "")),
                "metric": rec.get("metric", ""),
                "score": rec.get("score"),
                "run_id": run_id or "",
                "run_url": run_url(ui, run_id) if ui and run_id else "",
                "version_url": version_url(ui, name, version) if ui and name and version else "",
            }
        )
    return rows


def _cell(text: Any) -> str:
    """A value as one markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _link(text: str, url: str) -> str:
    return f"[{text}]({url})" if url else text


def registry_markdown(records: dict[str, dict[str, Any] | None], uri: str) -> str:
    """The cells' registry decisions as a markdown table, linked to MLflow where it is http."""
    ui = ui_url(uri)
    lines = [
        "# Registry decisions",
        "",
        "| cell | registered version | champion | gate | reason | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for r in registry_rows(records, uri):
        if not r["version_uri"]:
            lines.append(f"| {_cell(r['cell'])} | {r['model']} | | | | |")
            continue
        version = _link(f"`{r['version_uri']}`", r["version_url"])
        if r["new_version"]:
            version += " (new)"
        champion = r["champion"]
        if r["champion_uri"] != NO_CHAMPION:
            champion += f" `{r['champion_uri']}`"
        gate = r["decision"]
        if isinstance(r["score"], (int, float)) and r["metric"]:
            gate += f" ({r['metric']} {r['score']:.4f})"
        run = _link(f"`{r['run_id']}`", r["run_url"]) if r["run_id"] else ""
        cols = [_cell(r["cell"]), version, _cell(champion), _cell(gate), _cell(r["reason"]), run]
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    if ui:
        lines.append(f"MLflow UI: [{ui}]({ui})")
    else:
        lines.append(f"MLflow store `{uri}` has no web UI to link: run `{ui_hint(uri)}`.")
    return "\n".join(lines) + "\n"


def publish(
    records: dict[str, dict[str, Any] | None],
    uri: str,
    *,
    summary: str | None = None,
    where: str = "",
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> list[str]:
    """Create the artifacts (summary only when given); returns the keys created.

    Each artifact on its own: one that cannot be created is logged as a warning and skipped.
    Call it inside a flow or task run (the artifacts belong to that run).
    """
    log = logger or logging.getLogger(__name__)
    suffix = f" ({where})" if where else ""
    ui = ui_url(uri)
    jobs: list[tuple[str, Any, dict[str, Any]]] = []
    if summary is not None:
        jobs.append(
            (
                SUMMARY_KEY,
                pa.create_markdown_artifact,
                {"markdown": summary, "description": f"reports/summary.md{suffix}"},
            )
        )
    if records:
        jobs += [
            (
                REGISTRY_KEY,
                pa.create_markdown_artifact,
                {
                    "markdown": registry_markdown(records, uri),
                    "description": f"reports/registry/<cell>.json{suffix}",
                },
            ),
            (
                TABLE_KEY,
                pa.create_table_artifact,
                {
                    "table": registry_rows(records, uri),
                    "description": f"reports/registry/<cell>.json{suffix}",
                },
            ),
        ]
    if ui:
        jobs.append(
            (
                MLFLOW_KEY,
                pa.create_link_artifact,
                {"link": ui, "link_text": "MLflow UI", "description": "runs and registered models"},
            )
        )
    done = []
    for key, create, kwargs in jobs:
        try:
            create(key=key, **kwargs)
        except Exception as err:  # a view only: the reports on disk are what counts
            log.warning("artifact %s not published (the reports are on disk): %r", key, err)
        else:
            done.append(key)
    return done
