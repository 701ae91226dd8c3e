"""Reading the registry: resolve a ``models:/`` URI, fetch its checkpoint, list what is there.

Loading needs no unpickling: a version's source is an MLflow pyfunc model whose
``compressor`` artifact is the checkpoint folder (``compressor.safetensors`` +
``compressor.json``; ``mc_registry.mlmodel``), or, for versions registered before that format,
the plain checkpoint folder itself. Either way :func:`download` returns the checkpoint folder,
read by ``mc_core.compressors.checkpoint.load_compressor``; see :func:`load_compressor`.

A version's tags (set by ``tasks.tracking.register_checkpoint``) hold its ``score`` (what the
alias ranks by), ``metric``, ``ckpt_sha256`` and lineage (``base_sha256``, ``dvc.<path>``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mc_registry.names import CHAMPION, parse_uri
from mc_registry.store import client, tracking_uri

__all__ = [
    "Registered",
    "champion",
    "current_champion",
    "download",
    "load_compressor",
    "registered_models",
    "resolve",
    "score_of",
    "version_tags",
]


def score_of(version: Any) -> float | None:
    """A model version's ``score`` tag as a float; None when missing or not a number."""
    try:
        return float(version.tags["score"])
    except (KeyError, TypeError, ValueError):
        return None


def _champion_version(c, name: str):
    """The version holding alias ``champion`` (with its tags), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model or no alias yet
        return None


def champion(
    name: str, *, uri: str | None = None, base_sha256: str | None = None
) -> tuple[str, float | None, dict] | None:
    """``(version, score tag, tags)`` of the version holding alias ``champion``; None without
    one. One registry read: the alias lookup returns the version with its tags.

    With ``base_sha256``, a champion trained against another base model (its ``base_sha256``
    tag differs or is missing) counts as none: its scores were measured on other weights."""
    mv = _champion_version(client(uri), name)
    if mv is None:
        return None
    tags = dict(mv.tags or {})
    if base_sha256 is not None and tags.get("base_sha256") != base_sha256:
        return None
    return str(mv.version), score_of(mv), tags


def current_champion(
    name: str, *, uri: str | None = None, base_sha256: str | None = None
) -> tuple[str, float | None] | None:
    """``(version, score tag)`` of `champion` (same arguments), without the tags."""
    found = champion(name, uri=uri, base_sha256=base_sha256)
    return None if found is None else found[:2]


def version_tags(name: str, version: str, *, uri: str | None = None) -> dict[str, str]:
    """The tags of one registered version (its ``score``, ``ckpt_sha256``, gate...); MLflow's
    own exception when the model or the version does not exist."""
    return dict(client(uri).get_model_version(name, str(version)).tags)


def resolve(model_uri: str, *, uri: str | None = None) -> tuple[str, str]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, version)."""
    name, alias, version = parse_uri(model_uri)
    if alias:
        version = client(uri).get_model_version_by_alias(name, alias).version
    return name, str(version)


def download(model_uri: str, dst: str | Path | None = None, *, uri: str | None = None) -> Path:
    """Download a registered version (``models:/<name>@champion`` or ``/<version>``); returns
    its checkpoint folder (inside the MLflow model, or the version itself for a plain folder)."""
    import mlflow.artifacts

    from mc_registry.mlmodel import checkpoint_in

    uri = uri or tracking_uri()
    name, version = resolve(model_uri, uri=uri)
    # Resolved here rather than through mlflow's models:/ repository, which reads the global
    # registry URI instead of the one we were given.
    source = client(uri).get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dst) if dst else None, tracking_uri=uri
    )
    return checkpoint_in(local)


def load_compressor(model_uri: str, *, expect: dict | None = None, uri: str | None = None):
    """One call from the registry to a ``Compressor``: download, then read safetensors + JSON.

    Example: ``load_compressor("models:/metacompress-tiny-llava-r0.9@champion")``.
    """
    from mc_core.compressors.checkpoint import load_compressor as _load

    return _load(download(model_uri, uri=uri), expect=expect)


@dataclass(frozen=True)
class Registered:
    """One registered model and its champion (``version`` None: no champion yet)."""

    name: str
    version: str | None = None
    score: float | None = None
    metric: str = "score"  # the champion's ``metric`` tag: what ``score`` measures
    run_metrics: dict[str, float] = field(default_factory=dict)  # of the champion's run


def registered_models(*, uri: str | None = None) -> list[Registered]:
    """Every registered model, by name, with its champion's version, score and run metrics."""
    c = client(uri)
    out = []
    for rm in sorted(c.search_registered_models(), key=lambda r: r.name):
        mv = _champion_version(c, rm.name)
        if mv is None:
            out.append(Registered(rm.name))
            continue
        metrics = dict(c.get_run(mv.run_id).data.metrics) if mv.run_id else {}
        metric = (mv.tags or {}).get("metric", "score")
        out.append(Registered(rm.name, str(mv.version), score_of(mv), metric, metrics))
    return out
