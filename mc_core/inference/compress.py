"""Compression inserted before the LLM: an image's visual tokens replaced by `P @ X`.

`compress_inputs` takes the processor's output for a prompt, asks the adapter for each image's
projector output and context, runs the compressor (FastV: after a pass that reads the first
prompt's attention at LLM layer K) and returns inputs whose image placeholders hold the m
compressed tokens. Every path that runs a compressed model goes through it: the inference
engine, serving, the training targets' student side and the evaluation probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from mc_core.compressors.base import PROMPT_FIELDS
from mc_core.models.adapters import prompt_attention, prompt_embeddings

__all__ = ["compress_inputs", "token_contexts"]


def compress_inputs(
    model,
    adapter,
    compressor,
    model_inputs: dict[str, Any],
    *,
    fastv_layer: int | None = None,
    rate: float | Sequence[float | None] | None = None,
) -> tuple[dict[str, Any], list[Tensor] | None, list[Tensor] | None]:
    """Model inputs with each image's visual tokens replaced by the compressor's output.

    Args:
        model: the LVLM (frozen).
        adapter: its family adapter.
        compressor: a `mc_core.compressors.Compressor`, or None for the untouched inputs.
        model_inputs: processor output for a prompt holding all the images (for a
            prompt-dependent method, fastv or cdpruner: the first turn's prompt).
        fastv_layer: LLM layer K whose attention ranks tokens for prompt-dependent methods
            (default: the compressor's `layer` attribute, else FastV's K = 2, capped at the
            LLM's last layer so shallow test models can run it).
        rate: compress at this rate instead of the compressor's own (`Compressor.forward`),
            or one rate (None: the compressor's) per image of `model_inputs`, in order.

    Returns:
        `(inputs, tokens, P)`: the inputs `model(**inputs)` accepts, the compressed tokens
        `[m_i, d]` per image (model dtype) and `P [m_i, n_i]` per image; both None without a
        compressor.
    """
    if compressor is None:
        return dict(model_inputs), None, None
    tokens = adapter.visual_tokens(model_inputs)  # list of (n_i, d)
    contexts = token_contexts(
        model, adapter, compressor, model_inputs, tokens, fastv_layer=fastv_layer
    )
    # Compressors run in float32 (the trained generator's dtype); the model's dtype after.
    dtype = tokens[0].dtype
    ys, ps = compressor([t.float() for t in tokens], contexts, rate=rate)
    ys = [y.to(dtype) for y in ys]
    return adapter.inputs_with(model_inputs, ys, P=list(ps)), ys, list(ps)


def token_contexts(
    model, adapter, compressor, model_inputs, tokens: list[Tensor], *, fastv_layer=None
) -> list:
    """Each image's `TokenContext` with the fields `compressor.needs`: the adapter gives the
    vision side, the prompt's fields (`PROMPT_FIELDS`) come from the LLM side here.

    Args:
        tokens: the images' uncompressed visual tokens (`adapter.visual_tokens(model_inputs)`).
        fastv_layer: see `compress_inputs`.
    """
    needs = frozenset(compressor.needs)
    contexts = adapter.contexts(model_inputs, need=needs - PROMPT_FIELDS)
    if "prompt_attention" in needs:
        layer = fastv_layer
        if layer is None:
            n_layers = int(model.config.get_text_config().num_hidden_layers)
            layer = min(int(getattr(compressor, "layer", 2)), n_layers - 1)
        scores = prompt_attention(model, adapter, model_inputs, layer=layer, visual_tokens=tokens)
        for ctx, s in zip(contexts, scores, strict=True):
            ctx.prompt_attention = s
    if "prompt_embeddings" in needs:
        for ctx, e in zip(contexts, prompt_embeddings(model, adapter, model_inputs), strict=True):
            ctx.prompt_embeddings = e
    return contexts
