"""Where and how a model runs: the device, the dtype, the frozen model's preparation.

One copy of each rule for training, evaluation, serving, the front-ends and the benchmarks:
``device: auto`` is CUDA when present, else the CPU; ``dtype: auto`` is bfloat16 on CUDA and
float32 on the CPU; a frozen model is put in eval mode without gradients, and on CUDA uses SDPA.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = [
    "DTYPES",
    "auto_dtype",
    "model_device",
    "prepare_model",
    "resolve_device",
    "resolve_dtype",
    "token_dim",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device, *, where: str = "device") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA raises ValueError.

    Under torchrun a CUDA device without an index is this process's ``cuda:LOCAL_RANK``: one
    GPU per rank.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"{where}={device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}={device!r} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def auto_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (half the weight and activation memory of float32, native on Ampere+),
    float32 elsewhere (bf16 matmuls are slow on CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, *, where: str = "dtype"
) -> torch.dtype:
    """A dtype name, 'auto' or None (both `auto_dtype`), or a torch dtype as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"{where}={dtype!r}: expected 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[dtype]


def prepare_model(model, device: torch.device, dtype: str | torch.dtype = "auto"):
    """Freeze the LVLM (eval, no gradients), cast it to `dtype` (`resolve_dtype`) and move it;
    on CUDA use SDPA attention (fused kernels: no [L, L] attention matrix kept for backward)."""
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=resolve_dtype(dtype, device, where="train.dtype"))
    if device.type == "cuda":
        # Classes without the setter keep what their config chose.
        with contextlib.suppress(AttributeError, ValueError):
            model.set_attn_implementation("sdpa")
    return model


def model_device(model) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def token_dim(model) -> int:
    """Width d of the visual tokens the compressors see (the LLM hidden size)."""
    return int(model.config.get_text_config().hidden_size)
