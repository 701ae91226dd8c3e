"""Where the MLflow store is and how to open it: the tracking URI, a client, the schema.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a shared server), else
``sqlite:///<root>/mlflow.db`` where ``<root>`` is the working directory (DVC runs every stage
from the checkout). With a SQLite store, artifacts go to ``<db folder>/mlartifacts/<experiment>``
(``tasks.tracking``) and the store's file locks to ``<db folder>/mlartifacts/.locks``.

The SQLite schema is created once, under a file lock, by :func:`migrate` (the flow calls it
before fanning cells out: concurrent first connections race in MLflow's migrations).
"""

from __future__ import annotations

import os
from pathlib import Path

from mc_registry.locks import file_lock

__all__ = ["ENV_URI", "client", "lock_dir", "migrate", "sqlite_path", "tracking_uri"]

ENV_URI = "MLFLOW_TRACKING_URI"
_MIGRATED: set[str] = set()


def tracking_uri(root: str | Path | None = None) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``."""
    env = os.environ.get(ENV_URI)
    if env:
        return env
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store (a server)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def lock_dir(uri: str) -> Path:
    """Where the store's file locks live."""
    # Inside mlartifacts/ (local MLflow state, git-ignored), beside the SQLite database.
    db = sqlite_path(uri)
    base = db.parent if db is not None else Path.cwd()
    return base / "mlartifacts" / ".locks"


def client(uri: str | None = None):
    """An ``MlflowClient`` on ``uri`` (default :func:`tracking_uri`), schema migrated first."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    migrate(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def migrate(uri: str | None = None) -> str:
    """Create or upgrade the store's schema once, under a file lock; returns the URI."""
    uri = uri or tracking_uri()
    if uri in _MIGRATED:
        return uri
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.exceptions import MlflowException

    with file_lock(lock_dir(uri) / "migrate.lock"):
        # The first store access runs MLflow's migrations; the lock serialises processes.
        try:
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
        except MlflowException as err:
            if db is not None:
                raise
            # A server that is down: MLflow has already retried (MLFLOW_HTTP_REQUEST_MAX_RETRIES
            # times, backoff MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); nothing was written.
            raise ConnectionError(
                f"MLflow tracking server {uri} ({ENV_URI}) is unreachable: {err.message}."
                " Nothing was logged or registered; start the server (make serve) or point "
                f"{ENV_URI} at a reachable store, then rerun the stage."
            ) from None
    _MIGRATED.add(uri)
    return uri
