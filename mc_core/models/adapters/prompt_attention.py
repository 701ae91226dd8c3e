"""What prompt-dependent methods read from the first turn's prompt.

`prompt_attention` (FastV): the attention each visual token receives from the prompt at LLM
layer K, from a pass of the uncompressed prefix through the first K + 1 decoder layers of the
frozen LLM, read by a forward hook as it is produced. `prompt_embeddings` (CDPruner): the LLM
input embeddings of the prompt's text after the image, the instruction the method conditions on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mc_core.models.adapters.base import Adapter
from mc_core.models.adapters.placeholders import ImageSlot, rewrite_placeholders

__all__ = ["prompt_attention", "prompt_embeddings"]


def _decoder_layers(model) -> tuple[Any, Any]:
    """(decoder, its layer ModuleList) of the LVLM's language model."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}'s decoder {type(decoder).__name__} has no `layers` ModuleList"
        )
    return decoder, layers


def _image_slots(adapter: Adapter, model_inputs) -> list[ImageSlot]:
    """Where each image's placeholders are (an identity rewrite: the same layout)."""
    counts = adapter.placeholder_counts(model_inputs)
    _, slots = rewrite_placeholders(
        model_inputs, adapter.image_token_id, counts, counts, pad_token_id=adapter._pad_token_id()
    )
    return slots


def _text_after(model_inputs, image_token_id: int, slots: list[ImageSlot]) -> list[Tensor]:
    """Per image, the positions of the valid text tokens after its placeholders in its row
    (the question, any instruction and the generation prompt).

    Raises:
        ValueError: an image with no text after it.
    """
    ids = model_inputs["input_ids"]
    mask = model_inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    text = valid & (ids != image_token_id)  # (B, L)
    out = []
    for i, s in enumerate(slots):
        after = text[s.row].clone()
        after[: s.start + s.count] = False
        if not after.any():
            raise ValueError(f"image {i} (row {s.row}) has no prompt text after it")
        out.append(after.nonzero().squeeze(1))
    return out


def _prompt_queries(model_inputs, image_token_id: int, slots: list[ImageSlot]) -> list[Tensor]:
    """Per image, the position of the last valid text token of its row, which must follow the
    image's placeholders (a [1] tensor): FastV ranks by that token's attention alone, the one
    that has read the whole prompt (the official implementation does the same)."""
    return [pos[-1:] for pos in _text_after(model_inputs, image_token_id, slots)]


@contextlib.contextmanager
def _first_layers_eager(model, adapter: Adapter, layer: int) -> Iterator[None]:
    """For the block: the LLM runs layers 0..`layer` only, eager attention; all restored after
    (also on error), and the adapter's model state reset on both sides."""
    text_cfg = getattr(model.config, "text_config", model.config)
    decoder, layers = _decoder_layers(model)
    # Several configs may hold the depth (the text config, the decoder's own if distinct).
    configs = [text_cfg] if decoder.config is text_cfg else [text_cfg, decoder.config]
    depths = [c.num_hidden_layers for c in configs]
    previous = text_cfg._attn_implementation
    nested = text_cfg is not model.config
    adapter.reset_state()
    try:
        # Qwen2-VL's text model loops over every entry of `layers`, Llama/Qwen2 over
        # `layers[:num_hidden_layers]`: shortening both stops every family after layer K.
        decoder.layers = torch.nn.ModuleList(list(layers)[: layer + 1])
        for c in configs:
            c.num_hidden_layers = layer + 1
        model.set_attn_implementation({"text_config": "eager"} if nested else "eager")
        yield
    finally:
        model.set_attn_implementation({"text_config": previous} if nested else previous)
        for c, depth in zip(configs, depths, strict=True):
            c.num_hidden_layers = depth
        decoder.layers = layers
        adapter.reset_state()


def _check_request(model, adapter, model_inputs, layer, visual_tokens) -> Any:
    """The LLM's decoder layers, once `layer` and `visual_tokens` are known to fit them."""
    _, layers = _decoder_layers(model)
    n_layers = len(layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(
            f"prompt_attention layer={layer!r} is out of range: the LLM has {n_layers} layers "
            f"(0..{n_layers - 1})"
        )
    counts = adapter.placeholder_counts(model_inputs)
    if visual_tokens is not None:
        adapter._check_tokens(visual_tokens, expect=len(counts))
        got = [int(t.shape[0]) for t in visual_tokens]
        if got != counts:
            raise ValueError(
                f"prompt_attention visual_tokens have {got} rows but the placeholders need "
                f"{counts} (pass the uncompressed adapter.visual_tokens output)"
            )
    return layers


def prompt_attention(
    model,
    adapter: Adapter,
    model_inputs,
    *,
    layer: int = 2,
    visual_tokens: list[Tensor] | None = None,
) -> list[Tensor]:
    """FastV scores: attention each visual token receives from the prompt after its image.

    Runs the uncompressed prefix (`model_inputs`: image(s), question, generation prompt) through
    LLM layers 0..`layer` only: for the call, this model instance's decoder `layers` ModuleList
    is cut to `layer + 1` entries, `num_hidden_layers` set to match and the LLM switched to eager
    attention (all three restored afterwards, also on error). A forward hook on layer `layer`'s
    attention reduces its weights as they are produced, so no other layer's map is kept: the
    weights of the prompt's last token (the one that has read the whole question; padding
    skipped) are averaged over heads, keeping that image's columns, as in FastV's own code.
    The vision tower is skipped when `visual_tokens` are given; the LM head only sees the last
    position.

    Args:
        model: the LVLM `adapter` wraps.
        adapter: `adapter_for(model)`.
        model_inputs: processor output for the prefix (batch of dialogues allowed).
        layer: LLM layer index K (0-based; FastV uses K = 2).
        visual_tokens: `adapter.visual_tokens(model_inputs)` when the caller already has them
            (one [n_i, d] tensor per image, uncompressed); computed here otherwise.

    Returns:
        One [n_i] float32 tensor per image, batch order.

    Raises:
        ValueError: `layer` out of range (the message names the LLM's depth), `visual_tokens`
            not matching the placeholders, or an image with no text after it.
    """
    layers = _check_request(model, adapter, model_inputs, layer, visual_tokens)
    slots = _image_slots(adapter, model_inputs)
    queries = _prompt_queries(model_inputs, adapter.image_token_id, slots)

    with torch.no_grad():
        # The same forward (P = I is exact) without the vision tower, so only the LLM runs.
        if visual_tokens is None:
            visual_tokens = adapter.visual_tokens(model_inputs)
        inputs = adapter.inputs_with(model_inputs, visual_tokens)

    scores: list[Tensor] = []

    def keep_scores(_module, _args, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"layer {layer}'s attention returned no weights under eager attention"
            )
        for s, q in zip(slots, queries, strict=True):
            rows = weights[s.row, :, q, s.start : s.start + s.count]  # (H, q_i, n_i)
            scores.append(rows.float().mean(dim=(0, 1)))  # (n_i,)

    with _first_layers_eager(model, adapter, layer):
        hook = layers[layer].self_attn.register_forward_hook(keep_scores)
        try:
            with torch.no_grad():
                model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
    if len(scores) != len(slots):
        raise RuntimeError(
            f"layer {layer}'s attention gave {len(scores)} scores for {len(slots)} images"
        )
    return scores


@torch.no_grad()
def prompt_embeddings(model, adapter: Adapter, model_inputs) -> list[Tensor]:
    """Per image, the LLM input embeddings of the valid text tokens after its placeholders in
    its row (the question, any instruction and the generation prompt): [t_i, d] float32.

    Raises:
        ValueError: an image with no text after it.
    """
    slots = _image_slots(adapter, model_inputs)
    ids = model_inputs["input_ids"]
    embed = model.get_input_embeddings()
    return [
        embed(ids[s.row, pos]).float()
        for s, pos in zip(
            slots, _text_after(model_inputs, adapter.image_token_id, slots), strict=True
        )
    ]
