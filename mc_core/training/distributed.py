"""Data-parallel training of the compressor over several processes (``torch.distributed``).

The generator has a few thousand parameters and the frozen LVLM none to train, so every rank
holds the whole frozen model and a replica of the generator; a step splits the global batch of
``train.batch_size`` dialogues across ranks (`shard`: contiguous, in the single-process order),
each rank backpropagates its share of the loss, and the gradients are summed with one
all-reduce of a flat buffer (`sum_grads`) before clipping and the optimizer step, so every
replica takes the same step. A hand-written all-reduce rather than DDP: a rank may get no
dialogue in a small last batch (DDP needs a forward on every rank), the loss shares are
weighted by global token counts anyway, and one buffer of a tiny model is one message.

Processes are started by ``torchrun`` (``torch.distributed.run``): `init` joins the group it
describes through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``);
``tasks.train`` re-executes itself under it (`torchrun_argv`) when
``train.distributed.nproc_per_node`` > 1. Without a process group everything here is the
single-process identity (rank 0 of 1).

Torch is imported inside the functions: ``mc_core.training.config`` imports `DistributedConfig` and
validating params must not load the model stack.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

__all__ = [
    "DistributedConfig",
    "agree",
    "all_sum",
    "barrier",
    "init",
    "launched",
    "resolve_backend",
    "shard",
    "shutdown",
    "sum_grads",
    "torchrun_argv",
    "world",
]

# Long enough for a rank to wait while another builds the target cache of a 7B model.
_TIMEOUT = datetime.timedelta(minutes=60)


class DistributedConfig(BaseModel):
    """``train.distributed``: data-parallel generator training.

    Attributes:
        nproc_per_node: processes (one per GPU) on this host; 1 trains in one process.
        backend: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    nproc_per_node: int = Field(1, ge=1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"


def launched() -> bool:
    """Whether this process was started by torchrun (its rank variables are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> nccl on CUDA, gloo on CPU; nccl on a CPU device is an error naming the key."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"train.distributed.backend={backend!r} needs CUDA, but the device is {device}; "
            "use 'auto' or 'gloo'"
        )
    return backend


def init(backend: str, device: torch.device) -> bool:
    """Join the torchrun process group (no-op outside torchrun or for one process).

    On CUDA the rank's device must already be ``cuda:LOCAL_RANK`` (`mc_core.training.loop.
    resolve_device` picks it). Returns whether a group of more than one process is up.
    """
    import torch
    import torch.distributed as dist

    if not launched() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if dist.is_initialized():
        return True
    name = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(name, timeout=_TIMEOUT)
    return True


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group if one is up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_argv(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``python -m <module> <args>`` as ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one host: a private rendezvous on a free port
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]


def shard(items: Sequence[int], rank: int, size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of ``items``; part sizes differ by at most one and the
    parts, concatenated in rank order, are ``items`` (some are empty when fewer items than
    ranks)."""
    n = len(items)
    lo = rank * (n // size) + min(rank, n % size)
    hi = lo + n // size + (1 if rank < n % size else 0)
    return list(items[lo:hi])


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum of each value over the ranks (float64, so token counts stay exact)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def agree(value: int, what: str, device: torch.device) -> None:
    """Raise on every rank unless all ranks hold the same ``value``."""
    import torch
    import torch.distributed as dist

    # min of (v, -v): the smallest value and minus the largest, in one message.
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    lo, hi = int(t[0]), -int(t[1])
    if lo != hi:
        raise RuntimeError(f"ranks disagree on {what}: from {lo} to {hi}")


def sum_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's ``.grad`` over the ranks, in place, in one all-reduce.

    A parameter without a gradient on a rank contributes zeros; one without a gradient on
    every rank keeps ``grad = None``, as in one process (SGD skips it: a zero gradient would
    still move it by momentum).
    """
    import torch
    import torch.distributed as dist

    if not params:
        return
    ref = params[0]
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params
    ]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=ref.device)
    flat = torch.cat([*parts, has])
    dist.all_reduce(flat)
    sizes = [p.numel() for p in params]
    values, has = flat[: sum(sizes)].split(sizes), flat[sum(sizes) :]
    for p, g, h in zip(params, values, has.tolist(), strict=True):
        p.grad = g.view_as(p).to(p.dtype).clone() if h > 0 else None
