"""The micro-batch that fits: device memory budget, and the largest micro-batch whose estimated
peak (``mc_core.training.memory``) stays within it.

``TrainConfig.micro_batch: auto`` is ``fit_micro_batch(..., budget_bytes=memory_budget(device,
cfg.max_memory_gib))`` with the shapes of the run's data (``DialogueShapes`` from its encoded
dialogues). On CPU there is no budget: "auto" is the whole batch.

The margin on CUDA: the estimate counts tensors, not what the allocator and the kernels add
around them: the caching allocator's rounding and fragmentation (blocks rounded up, segments
that cannot be reused for a larger request), cuBLAS / SDPA workspaces, the CUDA context, and
NCCL's buffers under data parallelism. ``max(2 GiB, 10% of the device)`` covers these with room:
2 GiB is what the context, workspaces and NCCL take on one device, and 10% bounds the
fragmentation of a large device's allocator, which grows with the blocks it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mc_core import runtime
from mc_core.training import memory

__all__ = [
    "MARGIN_FRACTION",
    "MARGIN_MIN_BYTES",
    "DialogueShapes",
    "fit_micro_batch",
    "memory_budget",
    "usable_bytes",
]

_GIB = 1024**3
MARGIN_FRACTION = 0.10  # of the device's memory (module docstring)
MARGIN_MIN_BYTES = 2 * _GIB


def usable_bytes(device_bytes: int) -> int:
    """What a training process may plan for on a device of ``device_bytes``: less the margin
    ``max(2 GiB, 10%)`` (module docstring)."""
    return int(device_bytes - max(MARGIN_MIN_BYTES, MARGIN_FRACTION * device_bytes))


def memory_budget(device: str | torch.device, max_memory_gib: float | None = None) -> int | None:
    """Bytes a training step may use on ``device``.

    Args:
        device: the training device ("auto", "cpu", "cuda[:i]" or a ``torch.device``).
        max_memory_gib: an explicit budget in GiB (``TrainConfig.max_memory_gib``); wins over
            the device's.

    Returns:
        ``max_memory_gib`` in bytes when given; on CUDA the memory this process can have, the
        device's free memory plus what this process's allocator already holds (the estimate
        counts the weights whether or not they are loaded yet), less the margin
        ``max(2 GiB, 10% of the device)``; on any other device None (no budget).

    Raises:
        ValueError: ``max_memory_gib`` not a positive number, or the margin leaves nothing.
    """
    if max_memory_gib is not None:
        ok = isinstance(max_memory_gib, int | float) and not isinstance(max_memory_gib, bool)
        if not ok or not math.isfinite(max_memory_gib) or max_memory_gib <= 0:
            raise ValueError(
                f"memory_budget: max_memory_gib={max_memory_gib!r}: expected a positive number "
                "of GiB (train.max_memory_gib)"
            )
        return int(max_memory_gib * _GIB)
    device = runtime.resolve_device(device, where="memory_budget: device")
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    margin = max(MARGIN_MIN_BYTES, MARGIN_FRACTION * total)
    budget = free + torch.cuda.memory_reserved(device) - margin
    if budget <= 0:
        raise ValueError(
            f"memory_budget: {device} has {free / _GIB:.2f} GiB free of {total / _GIB:.2f} GiB, "
            f"no more than the margin of max(2 GiB, 10%): another process holds the device; "
            "free it or set train.max_memory_gib"
        )
    return int(budget)


@dataclass(frozen=True)
class DialogueShapes:
    """The shapes the estimate needs, from a run's dialogues.

    Attributes:
        seq_len: the longest compressed dialogue (text + the kept visual tokens).
        answer_tokens: the most answer tokens of a dialogue.
        images_per_dialogue: the most images of a dialogue.
        visual_tokens: ``(n, m)``: the most visual tokens of an image, and how many are kept.
    """

    seq_len: int
    answer_tokens: int
    images_per_dialogue: int
    visual_tokens: tuple[int, int]

    @classmethod
    def from_dialogues(
        cls, dialogues: Iterable[tuple[int, Sequence[int], int]], kept: Callable[[int], int]
    ) -> DialogueShapes:
        """From ``(full length, visual tokens per image, answer tokens)`` per dialogue (a
        target cache's ``e.length``, ``[len(t) for t in e.tokens]``, ``len(e.positions)``) and
        the compressor's ``kept(n)``.

        Raises:
            ValueError: no dialogues, or a dialogue without images.
        """
        seq = answers = images = n = 0
        for i, (length, visual, answer) in enumerate(dialogues):
            if not visual:
                raise ValueError(f"DialogueShapes: dialogue {i} has no image")
            seq = max(seq, int(length) - sum(int(v) - kept(int(v)) for v in visual))
            answers, images = max(answers, int(answer)), max(images, len(visual))
            n = max(n, *(int(v) for v in visual))
        if not seq:
            raise ValueError("DialogueShapes: no dialogues")
        return cls(seq, answers, images, (n, kept(n)))

    def kwargs(self) -> dict[str, Any]:
        """Keywords of ``fit_micro_batch`` (and, but for images_per_dialogue, of
        ``memory.estimate``)."""
        return dict(
            seq_len=self.seq_len,
            answer_tokens=self.answer_tokens,
            images_per_dialogue=self.images_per_dialogue,
            visual_tokens=self.visual_tokens,
        )


def _gib(x: int) -> str:
    return f"{x / _GIB:.2f} GiB"


def _too_big(est: dict[str, Any], budget: int, checkpointing: bool, dtype: str) -> ValueError:
    fixes = []
    if not checkpointing:
        fixes.append("train.activation_checkpointing: true (keeps one hidden state per layer)")
    if dtype == "float32":
        fixes.append("train.dtype: bfloat16 (halves the weights and activations)")
    fixes.append(
        "a device with more memory (more data-parallel GPUs do not help here: every rank "
        "holds the whole model and at least one dialogue)"
    )
    fixes.append("a higher rate or shorter dialogues (a shorter sequence)")
    return ValueError(
        f"fit_micro_batch: even a micro-batch of 1 needs {memory.format_estimate(est)}, over "
        f"the budget of {_gib(budget)}; try " + "; or ".join(fixes)
    )


def fit_micro_batch(
    model_or_config: Any,
    *,
    batch_size: int,
    budget_bytes: int | None,
    seq_len: int,
    answer_tokens: int,
    images_per_dialogue: int = 1,
    visual_tokens: tuple[int, int] = (576, 58),
    dtype: str | torch.dtype = "bfloat16",
    attn: str | None = None,
    generator_params: int = 0,
    target_topk: int | None = 64,
    activation_checkpointing: bool = False,
    vision: str = "store",
) -> tuple[int, dict[str, Any]]:
    """The largest micro-batch ``<= batch_size`` whose estimated peak is within the budget.

    Args:
        model_or_config: the LVLM or its config (built on the meta device once).
        batch_size: dialogues per step on this device (the global batch / ranks, rounded up).
        budget_bytes: ``memory_budget(...)``; None: no budget (the whole batch).
        seq_len, answer_tokens, images_per_dialogue, visual_tokens: the run's shapes
            (``DialogueShapes.kwargs()``).
        dtype, attn, generator_params, target_topk, activation_checkpointing, vision: as
            ``memory.estimate`` (``vision`` is ``TrainConfig.visual_tokens``).

    Returns:
        ``(micro_batch, estimate at micro_batch)``. The estimate grows with the micro-batch,
        so a budget equal to the estimate at k picks k.

    Raises:
        ValueError: bad arguments, or a micro-batch of 1 does not fit (the message names the
            estimate, the budget and what to change).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit_micro_batch: batch_size={batch_size!r}: expected a positive int")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or budget_bytes <= 0):
        raise ValueError(f"fit_micro_batch: budget_bytes={budget_bytes!r}: expected > 0 or None")
    if not isinstance(model_or_config, torch.nn.Module):  # one meta build for every probe
        model_or_config = memory.meta_model(model_or_config)

    def at(k: int) -> dict[str, Any]:
        return memory.estimate(
            model_or_config,
            batch_size=k,
            seq_len=seq_len,
            answer_tokens=answer_tokens,
            dtype=dtype,
            attn=attn,
            generator_params=generator_params,
            images=k * images_per_dialogue,
            visual_tokens=visual_tokens,
            target_topk=target_topk,
            activation_checkpointing=activation_checkpointing,
            vision=vision,
        )

    best = at(batch_size)
    if budget_bytes is None or best["total"] <= budget_bytes:
        return batch_size, best
    lo, hi = 0, batch_size  # at(lo) fits (lo = 0: nothing yet), at(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        est = at(mid)
        if est["total"] <= budget_bytes:
            lo, best = mid, est
        else:
            hi = mid
    if lo == 0:
        one = at(1)
        raise _too_big(one, budget_bytes, activation_checkpointing, one["inputs"]["dtype"])
    return lo, best
