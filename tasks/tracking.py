"""MLflow's write side for the pipeline: experiments, runs, logging, registering versions.

The read side (tracking URI, client and schema, ``models:/`` URIs, registered names, the
champion, downloading and loading a version) is ``mc_registry``, which the front-ends share.
Lineage (git sha, DVC hashes, checkpoint content hashes) is ``tasks/lineage.py``.

With a SQLite store (``mc_registry.store``), artifacts go to
``<db folder>/mlartifacts/<experiment>`` (MLflow would otherwise write ``./mlruns`` wherever
the process happens to run).

What is recorded:
- one run per training cell (arch, rate), found again by its tags by the evaluate and register
  stages: params, per-step curves, metrics, plots, tags ``arch``, ``rate``, ``git_sha``,
  ``dvc.<out>`` (the DVC hash of each input the stage used), ``ckpt_sha256``;
- one registered model per cell (``register.name_template``, e.g.
  ``metacompress-<arch>-r<rate>``: ``mc_registry.model_name``); a new version only when the
  checkpoint's content hash is new; alias ``champion`` on the best version by evaluation.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mc_registry import (
    CHAMPION,
    client,
    current_champion,
    file_lock,
    lock_dir,
    mlmodel,
    score_of,
    sqlite_path,
    tracking_uri,
)
from tasks import cells
from tasks.lineage import checkpoint_hash, dvc_hashes, git_sha

__all__ = [
    "Registration",
    "StepLogger",
    "cell_run_for",
    "end_run",
    "experiment_id",
    "find_cell_run",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "register_checkpoint",
    "set_champion",
    "set_tags",
    "start_cell_run",
]


def experiment_id(name: str, uri: str | None = None) -> str:
    """Get or create experiment ``name``; on SQLite its artifacts live under ``mlartifacts/``."""
    uri = uri or tracking_uri()
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db is not None else None
    with file_lock(lock_dir(uri) / "experiments.lock"):
        exp = c.get_experiment_by_name(name)
        return exp.experiment_id if exp else c.create_experiment(name, artifact_location=location)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


# -- runs ---------------------------------------------------------------------------------------


def find_cell_run(
    experiment: str, arch: str, rate: str, *, ckpt_sha256: str | None = None, uri: str | None = None
) -> str | None:
    """The newest training run of a cell (optionally of one checkpoint), or None."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    flt = f"tags.arch = '{arch}' and tags.rate = '{rate}' and tags.kind = 'train'"
    if ckpt_sha256:
        flt += f" and tags.ckpt_sha256 = '{ckpt_sha256}'"
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=flt,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _experiment_tag() -> dict[str, str]:
    """``dvc_exp``: the DVC experiment this stage runs in (``dvc exp run`` sets DVC_EXP_NAME),
    so a sweep's trials are found in MLflow by the names ``dvc exp show`` prints."""
    name = os.environ.get("DVC_EXP_NAME", "").strip()
    return {"dvc_exp": name} if name else {}


def start_cell_run(
    experiment: str,
    arch: str,
    rate: str,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> str:
    """Create the training run of a cell (status RUNNING); returns its id.

    Runs of the cell still RUNNING are marked KILLED first: a stage killed outright (SIGKILL,
    a lost machine) never ended its run, and the next run of the cell is its successor."""
    c = client(uri)
    exp_id = experiment_id(experiment, uri)
    stale = c.search_runs(
        [exp_id],
        filter_string=f"tags.arch = '{arch}' and tags.rate = '{rate}' and "
        "tags.kind = 'train' and attributes.status = 'RUNNING'",
    )
    for r in stale:
        c.set_terminated(r.info.run_id, "KILLED")
    all_tags = {
        "arch": arch,
        "rate": rate,
        "kind": "train",
        "git_sha": git_sha(),
        **dvc_hashes(["data/train", "data/test", str(cells.base_dir(arch))]),
        **_experiment_tag(),
        **(tags or {}),
    }
    run = c.create_run(exp_id, run_name=cells.run_name(arch, rate), tags=all_tags)
    log_params(run.info.run_id, params, uri=uri)
    return run.info.run_id


def cell_run_for(
    experiment: str, arch: str, rate: str, ckpt_sha256: str, *, uri: str | None = None
) -> str:
    """The training run of this checkpoint, or a closed stand-in run for it when none is found
    (the train stage was restored from DVC's cache, so no run of ours trained it)."""
    run_id = find_cell_run(experiment, arch, rate, ckpt_sha256=ckpt_sha256, uri=uri)
    if run_id is None:
        run_id = start_cell_run(
            experiment,
            arch,
            rate,
            params={"arch": arch, "rate": rate},
            tags={"ckpt_sha256": ckpt_sha256, "restored": "true"},
            uri=uri,
        )
        end_run(run_id, uri=uri)
    return run_id


def log_params(run_id: str, params: Mapping[str, Any], *, uri: str | None = None) -> None:
    """Log a flat mapping of params (values JSON-encoded when not strings)."""
    from mlflow.entities import Param

    items = [Param(k, _str(v)[:6000]) for k, v in params.items()]
    if items:
        client(uri).log_batch(run_id, params=items)


def log_metrics(
    run_id: str, metrics: Mapping[str, float], *, step: int | None = None, uri: str | None = None
) -> None:
    """Log numeric metrics (non-finite or non-numeric values are skipped) at ``step``."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(_metric_key(k), float(v), ts, step or 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v
    ]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; anything else becomes "_".
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", key)


def set_tags(run_id: str, tags: Mapping[str, Any], *, uri: str | None = None) -> None:
    """Set tags on a run."""
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, _str(v)) for k, v in tags.items()])


def log_artifacts(
    run_id: str, path: str | Path, artifact_path: str | None = None, *, uri: str | None = None
) -> None:
    """Upload a file or folder to the run's artifacts."""
    c = client(uri)
    path = Path(path)
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def end_run(run_id: str, status: str = "FINISHED", *, uri: str | None = None) -> None:
    """Mark a run finished (or FAILED)."""
    client(uri).set_terminated(run_id, status)


class StepLogger:
    """Per-step curves into one run, buffered so SQLite sees one write per ``flush_every`` steps.

    Call it as ``logger(step, {"loss": ..., "kl": ...})``; :meth:`flush` at the end.
    """

    def __init__(
        self, run_id: str, *, prefix: str = "train/", flush_every: int = 20, uri: str | None = None
    ):
        self.run_id, self.prefix, self.flush_every, self.uri = run_id, prefix, flush_every, uri
        self._buf: list[Any] = []

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                self._buf.append(Metric(_metric_key(self.prefix + k), float(v), ts, int(step)))
        if len(self._buf) >= self.flush_every * max(1, len(metrics)):
            self.flush()

    def flush(self) -> None:
        """Write buffered points (MLflow caps a batch at 1000 metrics)."""
        while self._buf:
            chunk, self._buf = self._buf[:1000], self._buf[1000:]
            client(self.uri).log_batch(self.run_id, metrics=chunk)


# -- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What ``tasks.register`` writes to ``reports/registry/<cell>.json``.

    ``repackages``: the versions of the same checkpoint registered before as plain folders
    that this version (an MLflow model of the same bytes) replaces (comma-separated), or None.
    """

    name: str
    version: str
    created: bool
    champion: str
    ckpt_sha256: str
    run_id: str
    score: float
    metric: str
    repackages: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return asdict(self)


def set_champion(name: str, *, higher_is_better: bool = True, uri: str | None = None) -> str:
    """Point alias ``champion`` at the best-scored version (ties: the newest); returns it."""
    c = client(uri)
    versions = c.search_model_versions(f"name = '{name}'")
    scored = [(s, int(v.version)) for v in versions if (s := score_of(v)) is not None]
    if not scored:
        raise ValueError(f"registered model {name!r} has no version with a 'score' tag")
    sign = 1.0 if higher_is_better else -1.0
    best = max(scored, key=lambda sv: (sign * sv[0], sv[1]))[1]
    c.set_registered_model_alias(name, CHAMPION, str(best))
    return str(best)


def _upload(
    c, run_id: str, ckpt_dir: str | Path, ckpt: str, base_dir, model_meta
) -> tuple[str, dict[str, str]]:
    """Upload a version's files to the run; returns (source URI, the tags saying its format).

    With ``base_dir``: an MLflow pyfunc model of the checkpoint (``mc_registry.mlmodel``)
    under ``model-<hash>``; without: the plain checkpoint folder under ``compressor-<hash>``.
    """
    if base_dir is None:
        artifact_path, fmt = f"compressor-{ckpt[:12]}", {}
        c.log_artifacts(run_id, str(ckpt_dir), artifact_path)
    else:
        artifact_path, fmt = f"model-{ckpt[:12]}", {mlmodel.FORMAT_TAG: mlmodel.FORMAT}
        with tempfile.TemporaryDirectory(prefix="mc-mlmodel-") as tmp:
            local = mlmodel.save_model(Path(tmp) / "model", ckpt_dir, base_dir, model_meta)
            c.log_artifacts(run_id, str(local), artifact_path)
    return f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}", fmt


def _versions_of(c, name: str, ckpt: str, *, pyfunc: bool) -> tuple[list, list]:
    """(versions of ``name`` holding checkpoint ``ckpt`` that count as it, older plain-folder
    versions of it that a pyfunc registration supersedes instead of reusing)."""
    same = [
        v for v in c.search_model_versions(f"name = '{name}'") if v.tags.get("ckpt_sha256") == ckpt
    ]
    if not pyfunc:
        return same, []
    old = [v for v in same if v.tags.get(mlmodel.FORMAT_TAG) != mlmodel.FORMAT]
    return [v for v in same if v not in old], old


def register_checkpoint(
    name: str,
    ckpt_dir: str | Path,
    *,
    run_id: str,
    score: float,
    metric: str,
    higher_is_better: bool = True,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
    promote: bool | None = None,
    base_dir: str | Path | None = None,
    model_meta: Mapping[str, Any] | None = None,
) -> Registration:
    """Register a checkpoint as a version of ``name`` unless that content already is one.

    The checkpoint's SHA-256 is the identity: registering the same bytes again returns the
    existing version (``created=False``). With ``base_dir`` (the register stage) the version is
    an MLflow pyfunc model of the checkpoint and that base model (``mc_registry.mlmodel``;
    ``model_meta``: lineage for its metadata), tagged ``format``; a checkpoint registered
    before only as a plain folder then gets a new version in this format, which takes the
    alias if one of those folders held it (``repackages``). Without ``base_dir`` the version is
    the plain checkpoint folder. Files go to ``run_id``'s artifacts; the version's source
    points at them. Per-name file lock: concurrent registrations of one name cannot both mint
    a version for the same checkpoint.

    ``promote``: None moves alias ``champion`` to the best-scored version (``set_champion``);
    True points it at this version; False leaves it where it is (a gated registration that
    failed its gate; ``champion`` is then the current holder, "" when there is none).
    """
    uri = uri or tracking_uri()
    c = client(uri)
    ckpt = checkpoint_hash(ckpt_dir)
    from mlflow.exceptions import MlflowException

    with file_lock(lock_dir(uri) / f"register-{name}.lock"):
        try:
            c.create_registered_model(name, tags={"project": "metacompress"})
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        existing, old = _versions_of(c, name, ckpt, pyfunc=base_dir is not None)
        repack = ",".join(sorted((str(v.version) for v in old), key=int))
        if existing:
            # The record names the version's own run (the one that trained it), whichever
            # later run of the same checkpoint asked.
            first = min(existing, key=lambda v: int(v.version))
            version, created, run_id = str(first.version), False, first.run_id or run_id
        else:
            source, fmt = _upload(c, run_id, ckpt_dir, ckpt, base_dir, model_meta)
            all_tags = {
                **{k: _str(v) for k, v in (tags or {}).items()},
                "ckpt_sha256": ckpt,
                "score": repr(float(score)),
                "metric": metric,
                **fmt,
            }
            if repack:
                all_tags["repackages"] = repack
            mv = c.create_model_version(name, source, run_id=run_id, tags=all_tags)
            version, created = str(mv.version), True
        champion = _move_champion(c, name, version, promote, higher_is_better, old, uri)
    return Registration(
        name=name,
        version=version,
        created=created,
        champion=champion,
        ckpt_sha256=ckpt,
        run_id=run_id,
        score=float(score),
        metric=metric,
        repackages=(repack or None) if created else None,
    )


def _move_champion(c, name, version, promote, higher_is_better, old, uri) -> str:
    """Apply ``promote`` (see :func:`register_checkpoint`); returns the champion's version."""
    if promote is None:
        return set_champion(name, higher_is_better=higher_is_better, uri=uri)
    if promote:
        c.set_registered_model_alias(name, CHAMPION, version)
        return version
    held = current_champion(name, uri=uri)
    if held and held[0] in {str(v.version) for v in old}:
        # The champion's own bytes, now as an MLflow model: the alias follows them, so
        # models:/<name>@champion loads with mlflow.pyfunc.
        c.set_registered_model_alias(name, CHAMPION, version)
        return version
    return held[0] if held else ""
