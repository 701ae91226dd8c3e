"""Compressor checkpoints: safetensors weights + a JSON description, no pickle anywhere.

A checkpoint is a directory with two files::

    compressor.safetensors   the module's state_dict (empty for heuristics)
    compressor.json          {"format", "method", "rate", "dim", "config", "fingerprint", "meta"}
                             (+ "rates" for an any-rate compressor)

``fingerprint`` records what the weights only make sense for: the LVLM ``family`` and token
``dim`` (plus the generator's settings), so loading a checkpoint into another model fails with
an error that names both sides instead of producing silent garbage.

An any-rate compressor (trained with ``TrainConfig.rates``) records the rates it was trained
over as ``"rates"``: ``[lo, hi]`` (a range) or three or more (a set). Its ``"rate"`` is the
nominal rate it runs at when a call gives none (``mc_core.training.rates.nominal_rate``: the
range's midpoint, the set's median member); every call may pick another
(``Compressor.forward``'s ``rate=``). Loaded, it has ``trained_rates`` set. A checkpoint
without ``"rates"`` (every one written before, every single-rate one) loads as it always did.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mc_core.compressors import Compressor, build
from mc_core.compressors.ops import check_rates
from mc_core.io import staged_dir, write_text

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "fingerprint", "load_compressor", "save_compressor"]

WEIGHTS_FILE = "compressor.safetensors"
CONFIG_FILE = "compressor.json"
FORMAT = 1


def fingerprint(compressor: Compressor, family: str | None) -> dict[str, Any]:
    """What a checkpoint is bound to: LVLM family, token dim, method, generator settings."""
    fp: dict[str, Any] = {"family": family, "dim": compressor.dim, "method": compressor.name}
    generator_config = getattr(compressor, "generator_config", None)
    if callable(generator_config):
        fp["generator"] = generator_config()
    return fp


def _jsonable(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} must be JSON-serialisable (no NaN/inf): {err}") from None


def save_compressor(path_dir: str | os.PathLike, compressor: Compressor, *, meta: dict) -> Path:
    """Write ``compressor`` to the directory ``path_dir`` atomically.

    The files are written into a temporary sibling directory that then replaces ``path_dir``,
    so a crash never leaves a half-written checkpoint.

    Args:
        path_dir: Target directory (created; an existing checkpoint there is replaced).
        compressor: Any registered compressor.
        meta: Free JSON-serialisable metadata (arch, data hash, step...). ``meta["family"]``
            (the LVLM family, e.g. "llava") goes into the fingerprint.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: ``meta`` is not a JSON-serialisable dict.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    target = Path(path_dir)
    family = meta.get("family")
    doc = {
        "format": FORMAT,
        "method": compressor.name,
        "rate": compressor.rate,
        "dim": compressor.dim,
        "config": _jsonable(compressor.config(), "compressor config"),
        "fingerprint": _jsonable(fingerprint(compressor, family), "fingerprint"),
        "meta": _jsonable(meta, "meta"),
    }
    if compressor.trained_rates is not None:  # absent otherwise: single-rate bytes unchanged
        doc["rates"] = list(check_rates(compressor.trained_rates, where="trained_rates"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in compressor.state_dict().items()}
    with staged_dir(target) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"method": compressor.name})
        write_text(tmp / CONFIG_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return target


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"checkpoint config {path} is missing")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint config {path} is unreadable or not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"checkpoint config {path} must hold a JSON object")
    missing = [k for k in ("method", "rate", "dim", "config", "fingerprint") if k not in doc]
    if missing:
        raise ValueError(f"checkpoint config {path} lacks {', '.join(missing)}")
    if doc.get("format", FORMAT) != FORMAT:
        raise ValueError(
            f"checkpoint config {path} has format {doc['format']!r}, expected {FORMAT}"
        )
    if not isinstance(doc["config"], dict) or not isinstance(doc["fingerprint"], dict):
        raise ValueError(f"checkpoint config {path}: 'config' and 'fingerprint' must be objects")
    if "rates" in doc:
        try:
            check_rates(doc["rates"])
        except ValueError as err:
            raise ValueError(f"checkpoint config {path}: {err}") from None
    return doc


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b))
        except (TypeError, ValueError):
            return False
    return a == b


def load_compressor(path_dir: str | os.PathLike, *, expect: dict | None = None) -> Compressor:
    """Rebuild a compressor from ``path_dir`` (via ``build``) and load its weights.

    Args:
        path_dir: A directory written by ``save_compressor``.
        expect: Fingerprint entries the caller requires, e.g. ``{"family": "llava",
            "dim": 4096}``; each must equal the checkpoint's.

    Returns:
        The compressor at the checkpoint's ``rate``; an any-rate one (``"rates"`` recorded)
        with ``trained_rates`` set.

    Raises:
        ValueError: A missing or corrupt file (named), or an ``expect`` entry that differs from
            the checkpoint's (both values and the file named).
    """
    root = Path(path_dir)
    cfg_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    doc = _read_config(cfg_path)
    fp = doc["fingerprint"]
    for key, want in (expect or {}).items():
        if key not in fp:
            raise ValueError(
                f"checkpoint {cfg_path} has no fingerprint entry {key!r} (expected {want!r}); "
                f"it records {sorted(fp)}"
            )
        if not _same(fp[key], want):
            raise ValueError(
                f"checkpoint {cfg_path} was trained for {key} = {fp[key]!r}, "
                f"but {key} = {want!r} is expected"
            )
    try:
        compressor = build(doc["method"], rate=doc["rate"], dim=doc["dim"], **doc["config"])
    except ValueError as err:
        raise ValueError(f"checkpoint config {cfg_path} does not build: {err}") from None
    if not weights_path.is_file():
        raise ValueError(f"checkpoint weights {weights_path} are missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint weights {weights_path} are corrupt: {err}") from None
    try:
        compressor.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint weights {weights_path} do not fit {doc['method']} "
            f"(dim {doc['dim']}): {err}"
        ) from None
    if "rates" in doc:
        compressor.trained_rates = tuple(float(r) for r in doc["rates"])
    return compressor
