"""A registered compressor as an MLflow model: the pyfunc flavor's files, schema and metadata.

Every version the register stage creates is an MLflow model folder (``MLmodel``) whose pyfunc
flavor is :class:`mc_registry.pyfunc.CompressorModel`, logged as code (MLflow's "models from
code": ``mc_registry/pyfunc_entry.py`` is copied into the model and run at load time; nothing
of ours is pickled). Its artifacts:

    artifacts/compressor/   compressor.safetensors + compressor.json (the checkpoint)
    artifacts/base_model/   the base model's folder (``models/base/<arch>``: a tiny model's
                            weights, or a real model's ``resolved.json`` pinning its weights)

The signature (see docs/serving.md, "The embedding worker as an MLflow model"): one row per
image, either ``image`` (encoded bytes; base64 in JSON) or ``tokens`` (the projector output
``[n, d]``, with ``grid`` ``[h, w]`` or ``positions`` ``[n, 2]`` where the model's layout
depends on the image); output ``embeds`` ``[m, d]``, ``n``, ``m``, ``grid_thw``; param ``rate``.

Versions registered before this format are plain checkpoint folders; :func:`checkpoint_in`
finds the checkpoint in either layout, so ``mc_registry.load_compressor`` reads both.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from importlib import metadata as dist
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_MODEL",
    "COMPRESSOR",
    "FORMAT",
    "FORMAT_TAG",
    "checkpoint_in",
    "describe",
    "example_image",
    "input_example",
    "is_model",
    "save_model",
    "signature",
]

FORMAT = "metacompress-pyfunc/1"
FORMAT_TAG = "format"  # model-version tag: FORMAT for MLflow models, absent for folders
COMPRESSOR = "compressor"  # the pyfunc artifact names
BASE_MODEL = "base_model"
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
_MLMODEL = "MLmodel"
# What the served model imports; pinned to this environment's versions (informative: serve
# with --env-manager local in the project's venv, where these are what runs).
_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "pillow", "numpy", "pandas")


def is_model(path: str | Path) -> bool:
    """Whether ``path`` is an MLflow model folder (has ``MLmodel``)."""
    return (Path(path) / _MLMODEL).is_file()


def checkpoint_in(path: str | Path) -> Path:
    """The compressor checkpoint folder inside a downloaded version: ``path`` itself for a
    plain checkpoint folder (versions before the pyfunc format), the ``compressor`` artifact
    of an MLflow model.

    Raises:
        ValueError: an MLflow model without a ``compressor`` artifact (names the file).
    """
    import yaml

    path = Path(path)
    if not is_model(path):
        return path
    mlmodel = path / _MLMODEL
    doc = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = doc.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    entry = artifacts.get(COMPRESSOR)
    if not isinstance(entry, dict) or "path" not in entry:
        raise ValueError(
            f"{mlmodel}: an MLflow model without a {COMPRESSOR!r} artifact (has "
            f"{sorted(artifacts)}): not a registered compressor"
        )
    return path / entry["path"]


def _read_json(path: Path) -> dict:
    """``path``'s JSON object; {} when the file is missing (the caller says what is absent)."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable or not JSON: {err}") from None
    return doc if isinstance(doc, dict) else {}


def describe(ckpt_dir: str | Path, base_dir: str | Path) -> dict[str, Any]:
    """What the model's metadata says of its checkpoint and base model, read from their files.

    Returns ``method``, ``rate``, ``rate_range`` (the rates this compressor serves: ``[rate,
    rate]``, an any-rate compressor's trained span), ``rates`` (an any-rate compressor's
    trained rates, else None), ``dim``, ``family`` and ``base_model``
    (``kind``: ``tiny`` or the real model's ``hub`` / ``folder``, ``source``, ``revision``,
    ``arch``, ``fingerprint``: the weights' content fingerprint in ``resolved.json``).
    Entries the files lack are None.
    """
    from mc_core.compressors.checkpoint import CONFIG_FILE

    ckpt = _read_json(Path(ckpt_dir) / CONFIG_FILE)
    base = _read_json(Path(base_dir) / "zoo.json")
    resolved = _read_json(Path(base_dir) / "resolved.json")
    rate, rates = ckpt.get("rate"), ckpt.get("rates")
    family = (ckpt.get("fingerprint") or {}).get("family") or base.get("family")
    span = [min(rates), max(rates)] if rates else [rate, rate] if rate is not None else None
    return {
        "method": ckpt.get("method"),
        "rate": rate,
        "rate_range": span,
        "rates": rates,
        "dim": ckpt.get("dim"),
        "family": family,
        "base_model": {
            "kind": resolved.get("kind", "tiny" if base else None),
            "source": resolved.get("source"),
            "revision": resolved.get("revision"),
            "arch": base.get("arch"),
            "fingerprint": resolved.get("fingerprint"),
        },
    }


def signature(rate: float | None):
    """The model's signature: inputs, outputs and the ``rate`` param (default ``rate``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    matrix = Array(Array(DataType.double))
    inputs = Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(matrix, "tokens", required=False),
            ColSpec(Array(DataType.long), "grid", required=False),
            ColSpec(matrix, "positions", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(Array(Array(DataType.float)), "embeds"),
            ColSpec(DataType.long, "n"),
            ColSpec(DataType.long, "m"),
            ColSpec(Array(DataType.long), "grid_thw", required=False),
        ]
    )
    params = None
    if rate is not None:
        params = ParamSchema([ParamSpec("rate", DataType.double, float(rate))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_image(size: int = 32) -> bytes:
    """A small PNG (a colour gradient) for the input example: any size serves, the model's
    processor resizes it."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def input_example():
    """One image row (the bytes MLflow stores base64-encoded in ``input_example.json``)."""
    import pandas as pd

    return pd.DataFrame({"image": [example_image()]})


def _requirements() -> list[str]:
    pins = []
    for name in (*_REQUIREMENTS, "metacompress"):
        try:
            pins.append(f"{name}=={dist.version(name)}")
        except dist.PackageNotFoundError:  # a checkout run without `pip install -e .`
            continue
    return pins


def save_model(
    path: str | Path,
    ckpt_dir: str | Path,
    base_dir: str | Path,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the MLflow model of a checkpoint to the new folder ``path``.

    Args:
        path: where the model folder goes (must not exist yet).
        ckpt_dir: the compressor checkpoint (safetensors + JSON).
        base_dir: the base model's folder (``models/base/<arch>``), copied as an artifact.
        meta: extra metadata (lineage: ``arch``, ``ckpt_sha256``, the base model's hashes);
            merged over :func:`describe`, ``base_model`` entries into its ``base_model``.

    Raises:
        ValueError: a missing checkpoint or base model folder (named).
    """
    import mlflow.pyfunc

    for what, folder in (("checkpoint", ckpt_dir), ("base model", base_dir)):
        if not Path(folder).is_dir():
            raise ValueError(f"{folder}: {what} folder not found")
    info = describe(ckpt_dir, base_dir)
    extra = dict(meta or {})
    info["base_model"].update(extra.pop("base_model", None) or {})
    info.update(extra)
    info["format"] = FORMAT
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(ENTRY),
        artifacts={COMPRESSOR: str(Path(ckpt_dir)), BASE_MODEL: str(Path(base_dir))},
        signature=signature(info["rate"]),
        input_example=input_example(),
        metadata=info,
        pip_requirements=_requirements(),
    )
    return Path(path)
