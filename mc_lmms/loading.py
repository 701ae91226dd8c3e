"""From lmms-eval's ``--model_args`` to a frozen base model and a compressor.

``pretrained`` is a folder written by ``mc_core.models.zoo.save`` (the tiny teachers), a name of
``mc_core.models.zoo.REAL`` or its Hugging Face id, or any other image-text-to-text checkpoint (id
or
local folder) whose class has an adapter (``mc_core.models.families.available()``).

``compressor`` is ``none``, a method name of ``mc_core.compressors.available()`` (heuristics,
built at ``rate``), a checkpoint folder (``mc_core.compressors.checkpoint``) or a registry URI
``models:/<name>@<alias>`` / ``models:/<name>/<version>`` (``mc_registry``; MLflow is imported
only then, and not needed otherwise). Checkpoints are refused when their fingerprint (family,
token width) differs from the model's, or when the requested rate is not theirs: a single-rate
checkpoint's own rate, or for an any-rate one (trained over ``rates``) a rate within their
span, which the model then passes to every compression call.

This module does not import lmms-eval, so it is usable (and tested) without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mc_core.compressors import available, build
from mc_core.compressors.checkpoint import load_compressor
from mc_core.compressors.ops import check_rate
from mc_core.models import zoo
from mc_core.models.families import adapter_for
from mc_core.runtime import model_device, prepare_model, resolve_device, resolve_dtype, token_dim

__all__ = ["load_base", "parse_dtype", "parse_rate", "resolve_compressor"]


def parse_rate(rate: Any) -> float | None:
    """``rate`` from model_args (a string from the CLI, or a number); None when absent."""
    if rate is None or (isinstance(rate, str) and not rate.strip()):
        return None
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"model_args rate={rate!r}: expected a number in (0, 1)") from None
    return check_rate(value, where="model_args rate")


def parse_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """``dtype`` from model_args: ``auto`` (or empty) follows the project's rule
    (``mc_core.runtime.resolve_dtype``: bfloat16 on CUDA, float32 on CPU), else a dtype name."""
    return resolve_dtype(None if dtype == "" else dtype, device, where="model_args dtype")


def _is_zoo_folder(path: Path) -> bool:
    try:
        zoo.info(path)
    except (OSError, ValueError):
        return False
    return True


def load_base(pretrained: str, *, device: str | None = None, dtype: Any = None):
    """The frozen base model (eval mode, no gradients) and its processor.

    Args:
        pretrained: a ``zoo.save`` folder, a ``zoo.REAL`` name or HF id, or another
            image-text-to-text checkpoint (HF id or folder).
        device: ``auto``/None (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto``/None, ``bfloat16``, ``float16`` or ``float32``.

    Returns:
        ``(model, processor)``.

    Raises:
        ValueError: an empty ``pretrained``, an unknown dtype, CUDA asked for but absent, or a
            model class without an adapter (the message lists the supported ones).
    """
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise ValueError(f"model_args pretrained={pretrained!r}: expected a folder or an HF id")
    dev = resolve_device("auto" if device in (None, "") else str(device), where="model_args device")
    torch_dtype = parse_dtype(dtype, dev)
    path = Path(pretrained).expanduser()
    if path.is_dir() and _is_zoo_folder(path):
        model, processor = zoo.load(path)
        prepare_model(model, dev, torch_dtype)  # the evaluator's placement: SDPA on CUDA
    else:
        real = {spec.hf_id: name for name, spec in zoo.REAL.items()}
        name = pretrained if pretrained in zoo.REAL else real.get(pretrained)
        if name is not None:
            model, processor = zoo.load_real(name, dtype=torch_dtype, device_map=str(dev))
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            model = AutoModelForImageTextToText.from_pretrained(
                pretrained, dtype=torch_dtype, device_map=str(dev)
            )
            processor = AutoProcessor.from_pretrained(pretrained)
        model.eval().requires_grad_(False)
    adapter_for(model)  # fail now, naming the class, rather than at the first request
    return model, processor


def _load_checkpoint(spec: str, expect: dict[str, Any], tracking_uri: str | None):
    if spec.startswith("models:/"):
        import mc_registry

        try:
            return mc_registry.load_compressor(spec, expect=expect, uri=tracking_uri)
        except ImportError as err:
            raise ValueError(
                f"model_args compressor={spec!r}: registry URIs need MLflow ({err})"
            ) from None
    return load_compressor(spec, expect=expect)


def resolve_compressor(
    spec: str | None, *, rate: float | None, model, tracking_uri: str | None = None
):
    """The compressor named by model_args, on the model's device, in eval mode (None = all
    visual tokens).

    Args:
        spec: ``none``, a method name, a checkpoint folder or a ``models:/`` URI.
        rate: the requested reduction rate; required for method names, checked against
            checkpoints when given (an any-rate checkpoint takes any rate in its span).
        model: the base model (its family and token width bind checkpoints).
        tracking_uri: MLflow tracking URI for ``models:/`` (default: ``$MLFLOW_TRACKING_URI``,
            else ``mlflow.db`` in the working directory).

    Raises:
        ValueError: an unknown method, a missing rate, a trainable method without a
            checkpoint, or a checkpoint for another family, width or rate.
    """
    spec = "none" if spec is None else str(spec).strip()
    if spec in ("", "none"):
        return None
    family = adapter_for(model).family
    dim = token_dim(model)
    if spec.startswith("models:/") or Path(spec).expanduser().is_dir():
        comp = _load_checkpoint(spec, {"family": family, "dim": dim}, tracking_uri)
        if rate is not None and not math.isclose(float(comp.rate), rate):
            if comp.trained_rates is None:
                raise ValueError(
                    f"model_args compressor={spec!r} was trained for rate {comp.rate}, "
                    f"but rate={rate} was requested"
                )
            if not comp.serves(rate):
                lo, hi = comp.rate_span()
                raise ValueError(
                    f"model_args rate={rate}: compressor={spec!r} was trained over rates "
                    f"{list(comp.trained_rates)}; request a rate in [{lo}, {hi}]"
                )
    elif spec in available():
        if rate is None:
            raise ValueError(f"model_args compressor={spec!r} needs rate=<0..1>, e.g. rate=0.9")
        comp = build(spec, rate=rate, dim=dim)
        if comp.trainable:
            raise ValueError(
                f"model_args compressor={spec!r} must be trained: pass its checkpoint folder "
                "or a models:/<name>@champion URI"
            )
    else:
        raise ValueError(
            f"model_args compressor={spec!r} is not a method ({', '.join(available())}), "
            "an existing checkpoint folder or a models:/ URI"
        )
    return comp.to(model_device(model)).eval().requires_grad_(False)
