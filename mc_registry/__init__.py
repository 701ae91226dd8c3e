"""The registry's read side: what a registered compressor is called, and how to get it back.

MLflow only (and ``mc_core`` to read a checkpoint): no pipeline code, so the front-ends
(``mc_cli``, ``mc_lmms``) and the pipeline (``tasks``, ``flows``) share it. The write side
(runs, logging, registering) is ``tasks/tracking.py``.

- ``mc_registry.store``: the tracking URI (``MLFLOW_TRACKING_URI`` or ``./mlflow.db``), a
  client, the schema migration.
- ``mc_registry.names``: registered model names (``metacompress-<arch>-r<rate>``), the rate's
  spelling, ``models:/`` URIs, the ``champion`` alias.
- ``mc_registry.read``: ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` -> version,
  local checkpoint folder or ``Compressor``; the champion of a model; every registered model.
- ``mc_registry.locks``: the cross-process file lock.
- ``mc_registry.mlmodel``: a version as an MLflow pyfunc model (signature, input example,
  metadata, saving; the checkpoint inside a downloaded version); ``mc_registry.pyfunc``: that
  model's code (images or visual tokens in, compressed embeddings out); ``mc_registry.scoring``:
  ``mlflow models serve`` of a version and requests to it. Imported on demand, not here: they
  pull in MLflow's pyfunc stack (pandas), which the front-ends' start-up does not need.

Example: ``mc_registry.load_compressor("models:/metacompress-tiny-llava-r0.9@champion")``.
"""

from __future__ import annotations

from mc_registry.locks import file_lock
from mc_registry.names import (
    ANY_NAME_TEMPLATE,
    CHAMPION,
    NAME_TEMPLATE,
    check_template,
    format_rate,
    model_name,
    model_uri,
    parse_uri,
)
from mc_registry.read import (
    Registered,
    champion,
    current_champion,
    download,
    load_compressor,
    registered_models,
    resolve,
    score_of,
    version_tags,
)
from mc_registry.store import ENV_URI, client, lock_dir, migrate, sqlite_path, tracking_uri

__all__ = [
    "CHAMPION",
    "ENV_URI",
    "ANY_NAME_TEMPLATE",
    "NAME_TEMPLATE",
    "Registered",
    "champion",
    "check_template",
    "client",
    "current_champion",
    "download",
    "file_lock",
    "format_rate",
    "load_compressor",
    "lock_dir",
    "migrate",
    "model_name",
    "model_uri",
    "parse_uri",
    "registered_models",
    "resolve",
    "score_of",
    "sqlite_path",
    "tracking_uri",
    "version_tags",
]
