"""One dialogue's share of the frozen model's side of training (`CacheEntry`): what the target
cache keeps in memory (`mc_core.training.targets`) and the target store on disk
(`mc_core.training.store`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mc_core.compressors import TokenContext
from mc_core.training.losses import TopKTarget

__all__ = ["CacheEntry"]


@dataclass
class CacheEntry:
    """What the frozen model gives for one dialogue (all on CPU).

    Attributes:
        base: the processor's inputs for the full gold dialogue (batch of one, n placeholders
            per image); pixel tensors are zero-memory stubs of their shape.
        tokens: projector output per image, `[n_i, d]`.
        contexts: `TokenContext` per image.
        positions: positions of the answer tokens in the full sequence, `[T]`.
        target: the distillation target, the full model's log-probs at those positions: all of
            them, `[T, V]` float32, or their top-k and tail mass (`TopKTarget`).
        length: full sequence length.
    """

    base: dict[str, Any]
    tokens: list[Tensor]
    contexts: list[TokenContext]
    positions: Tensor
    target: Tensor | TopKTarget
    length: int
