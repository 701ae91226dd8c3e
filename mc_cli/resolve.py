"""Turn what a person types (a model folder, a compressor spec, an image path) into objects.

Every failure is a `UsageError` whose message names the argument and the value, so the command
line can print one line and exit 2 instead of a traceback. Registry URIs are read through
`mc_registry` (MLflow only); devices follow `mc_core.runtime`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mc_registry

__all__ = [
    "UsageError",
    "check_compressor",
    "load_compressor",
    "load_dataset",
    "load_model",
    "open_image",
]

# Where `make run` puts the embedded default's base models: `--model tiny-llava` works.
BASE_DIR = Path("models/base")


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def load_model(spec: str, device: str = "auto"):
    """`(model, processor)` from a saved model folder (or `models/base/<spec>`), frozen on
    `device` (`mc_core.runtime.resolve_device`: `auto` is CUDA when present), in its saved dtype."""
    from mc_core.models import zoo
    from mc_core.runtime import resolve_device

    path = Path(spec)
    if not path.is_dir() and (BASE_DIR / spec).is_dir():
        path = BASE_DIR / spec
    if not path.is_dir():
        raise UsageError(
            f"--model {spec!r}: no such folder (give a saved model folder, e.g. "
            f"{BASE_DIR / 'tiny-llava'}, made by `make run`)"
        )
    try:
        model, processor = zoo.load(path)
    except (ValueError, OSError) as err:
        raise UsageError(f"--model {spec!r}: {err}") from None
    try:
        dev = resolve_device(device, where="--device")
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        model = model.to(dev)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device {device!r}: {err}") from None
    return model.eval().requires_grad_(False), processor


def check_compressor(spec: str | None, rate: float | None) -> None:
    """What can be checked of a compressor spec before the model loads (names, rate, paths)."""
    from mc_core.compressors import available, get_class

    if spec is None or spec == "none":
        return
    if spec.startswith("models:/"):
        try:
            mc_registry.parse_uri(spec)
        except ValueError as err:
            raise UsageError(f"--compressor {err}") from None
        _check_registry(mc_registry.tracking_uri(), f"--compressor {spec!r}")
    elif Path(spec).is_dir():
        return
    elif spec in available():
        if rate is None:
            raise UsageError(f"--compressor {spec!r} is a method name: give --rate too")
        if get_class(spec).trainable:
            raise UsageError(
                f"--compressor {spec!r} must be trained: give its checkpoint folder "
                f"(models/compressors/...) or a registry URI (models:/...@champion)"
            )
    else:
        raise UsageError(
            f"--compressor {spec!r}: not a method ({', '.join(available())}), "
            "a checkpoint folder or a models:/<name>@<alias> URI"
        )


def load_compressor(spec: str | None, model, rate: float | None) -> Any:
    """A compressor from a method name (needs `rate`), a checkpoint folder or a registry URI
    (`models:/<name>@champion`); None for `none` or no spec (all visual tokens).

    A checkpoint trained at one rate refuses another `--rate`; an any-rate one (trained over
    `rates`) takes any `--rate` within their span, which the command passes per call."""
    from mc_core.compressors import build
    from mc_core.runtime import model_device, token_dim

    check_compressor(spec, rate)
    if spec is None or spec == "none":
        return None
    dim = token_dim(model)
    if spec.startswith("models:/"):
        comp = _from_registry(spec, dim)
    elif Path(spec).is_dir():
        from mc_core.compressors.checkpoint import load_compressor as load_ckpt

        try:
            comp = load_ckpt(spec, expect={"dim": dim})
        except (ValueError, OSError) as err:
            raise UsageError(f"--compressor {spec!r}: {err}") from None
    else:
        comp = build(spec, rate=rate, dim=dim)
    if rate is not None and abs(float(comp.rate) - float(rate)) > 1e-9:
        if comp.trained_rates is None:
            raise UsageError(f"--rate {rate} differs from {spec!r}'s own rate {comp.rate}")
        if not comp.serves(rate):
            lo, hi = comp.rate_span()
            raise UsageError(
                f"--rate {rate}: {spec!r} was trained over rates {list(comp.trained_rates)}; "
                f"give a rate in [{lo}, {hi}]"
            )
    return comp.to(model_device(model)).eval()


def _from_registry(spec: str, dim: int):
    uri = mc_registry.tracking_uri()
    _check_registry(uri, "--compressor " + repr(spec))
    try:
        return mc_registry.load_compressor(spec, expect={"dim": dim}, uri=uri)
    except ImportError as err:  # an install without MLflow
        raise UsageError(
            f"--compressor {spec!r}: the MLflow registry is unavailable ({err})"
        ) from None
    except Exception as err:  # mlflow raises its own types for unknown names and aliases
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--compressor {spec!r} (registry {uri}): {first}") from None


def _check_registry(uri: str, what: str) -> None:
    """A local sqlite registry must exist: opening a missing one would create an empty one."""
    path = mc_registry.sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UsageError(
            f"{what}: no MLflow registry at {uri} (run `make run`, or set "
            "MLFLOW_TRACKING_URI to a tracking server)"
        )


def open_image(path: str):
    """An RGB PIL image from `path`."""
    from PIL import Image, UnidentifiedImageError

    from mc_core.data.images import to_rgb

    if not os.path.isfile(path):
        raise UsageError(f"IMAGE {path!r}: no such file")
    try:
        with Image.open(path) as im:
            return to_rgb(im.copy())
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"IMAGE {path!r}: not an image PIL can read ({err})") from None


def load_dataset(path: str):
    """A dialogue dataset folder (`mc_core.data.schema`)."""
    from mc_core.data import schema

    if not Path(path).is_dir():
        raise UsageError(f"--data {path!r}: no such folder (a dataset saved by tasks.prepare)")
    try:
        return schema.load(path)
    except (ValueError, OSError) as err:
        raise UsageError(f"--data {path!r}: {err}") from None
