"""Attention arithmetic the adapters share (vision [CLS] attention, FastV's prompt attention)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_probs", "feature_layer_index", "head_split", "scale_for"]


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Softmax attention probabilities, computed in float32.

    Args:
        q: [..., H, Nq, dh]; k: [..., H, Nk, dh].

    Returns:
        [..., H, Nq, Nk].
    """
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


def feature_layer_index(layer: int, num_layers: int, *, where: str) -> int:
    """Index of the encoder layer whose output is `hidden_states[layer]`.

    `hidden_states` holds the embeddings then every layer's output (num_layers + 1 entries), so
    `hidden_states[j + 1]` is layer j's output and `hidden_states[j]` its input.
    """
    idx = layer % (num_layers + 1) if layer < 0 else layer
    if not 1 <= idx <= num_layers:
        raise ValueError(f"{where}={layer} does not name an encoder layer's output")
    return idx - 1


def head_split(x: Tensor, heads: int) -> Tensor:
    """[..., N, H*dh] -> [..., H, N, dh]."""
    *lead, n, hd = x.shape
    return x.reshape(*lead, n, heads, hd // heads).transpose(-2, -3)


def scale_for(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
