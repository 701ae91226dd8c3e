"""Activation checkpointing of the frozen LLM (``TrainConfig.activation_checkpointing``).

A training step keeps, per decoder layer, every activation the backward pass into
``inputs_embeds`` needs (``mc_core.training.memory``): at 7B widths and the paper's batch that is
most of a GPU. Checkpointing keeps only each layer's input and recomputes the layer during the
backward, one layer at a time: about one more forward of the LLM per step for a memory that no
longer grows with the number of layers.

transformers' own per-layer checkpointing is used (non-reentrant ``torch.utils.checkpoint``,
which needs no input to require grad and so works with frozen weights). transformers applies it
to a layer only while ``layer.training`` is set; the frozen model stays in eval mode, so the flag
is set on the decoder-layer modules themselves and not on their children, whose dropout (read
from their own ``training``) stays off: the recomputed forward is the same function as the
first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["checkpointed_layers"]


def _decoder(model):
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None else model


@contextmanager
def checkpointed_layers(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, the LLM of ``model`` recomputes its decoder layers in the backward pass.

    Yields the number of checkpointed layers (0 when not ``enabled``); restores the model's
    flags on exit.

    Raises:
        ValueError: the model's LLM does not support transformers' gradient checkpointing.
    """
    if not enabled:
        yield 0
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder = _decoder(model)
    if not getattr(decoder, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.activation_checkpointing=true: {type(decoder).__name__} (the LLM of "
            f"{type(model).__name__}) does not support transformers' gradient checkpointing; "
            "set it to false"
        )
    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"train.activation_checkpointing=true: {type(decoder).__name__} has no checkpointable "
            "decoder layers; set it to false"
        )
    decoder.activation_checkpointing_enable({"use_reentrant": False})
    was = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield len(layers)
    finally:
        for m, flag in zip(layers, was, strict=True):
            m.training = flag
        decoder.activation_checkpointing_disable()
