"""One adapter per LVLM family; `for_model(model)` picks it by the model's class.

    adapter = for_model(model)
    x = adapter.visual_tokens(inputs)                  # list of [n_i, d]
    y, P = compressor(x, adapter.contexts(inputs, compressor.needs - {"prompt_attention"}))
    out = model(**adapter.inputs_with(inputs, y))      # or model.generate(**...)

`prompt_attention` gives FastV its scores (attention at one LLM layer from the first turn's
prompt to each image's tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mc_core.adapters.base import Adapter, rewrite_placeholders
from mc_core.adapters.internvl import InternVLAdapter
from mc_core.adapters.llava import LlavaAdapter
from mc_core.adapters.llava_next import LlavaNextAdapter
from mc_core.adapters.qwen2_vl import Qwen2VLAdapter

__all__ = ["Adapter", "available", "for_model", "prompt_attention", "supported_classes"]

_ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    InternVLAdapter,
)
_BY_CLASS = {name: cls for cls in _ADAPTERS for name in cls.model_classes}


def available() -> list[str]:
    """Families an adapter exists for ("internvl", "llava", "llava_next", "qwen2_vl")."""
    return sorted(cls.family for cls in _ADAPTERS)


def supported_classes() -> list[str]:
    """Model class names `for_model` accepts."""
    return sorted(_BY_CLASS)


def for_model(model) -> Adapter:
    """The adapter of `model`'s family, chosen by the model's class name.

    Raises:
        ValueError: no adapter for this model class (the message lists `available()` and the
            supported classes).
    """
    name = type(model).__name__
    if name not in _BY_CLASS:
        raise ValueError(
            f"no adapter for model class {name!r}; available families: {available()} "
            f"(classes {supported_classes()})"
        )
    return _BY_CLASS[name](model)


def prompt_attention(model, adapter: Adapter, model_inputs, *, layer: int = 2) -> list[Tensor]:
    """FastV scores: attention each visual token receives from the prompt after its image.

    Runs one uncompressed forward over `model_inputs` (the first turn's prefix: image(s), the
    question, the generation prompt) with the LLM switched to eager attention (restored
    afterwards, also on error), takes layer `layer`'s attention weights, averages over heads and
    over the query positions after the image's placeholders (other images' placeholders and
    padding excluded), and keeps the columns of that image's tokens.

    Args:
        model: the LVLM `adapter` wraps.
        adapter: `for_model(model)`.
        model_inputs: processor output for the prefix (batch of dialogues allowed).
        layer: LLM layer index K (0-based; FastV uses K = 2).

    Returns:
        One [n_i] float32 tensor per image, batch order.

    Raises:
        ValueError: `layer` out of range, or an image has no text after it.
    """
    text_cfg = getattr(model.config, "text_config", model.config)
    n_layers = int(text_cfg.num_hidden_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"prompt_attention layer={layer!r}: the LLM has layers 0..{n_layers - 1}")
    counts = adapter.placeholder_counts(model_inputs)
    # Identity rewrite: same layout, but it tells where each image's placeholders are.
    _, slots = rewrite_placeholders(
        model_inputs, adapter.image_token_id, counts, counts, pad_token_id=adapter._pad_token_id()
    )
    ids = model_inputs["input_ids"]
    mask = model_inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    text = valid & (ids != adapter.image_token_id)  # (B, L)

    with torch.no_grad():
        # The same forward (P = I is exact) without the vision tower, so only the LLM is asked
        # for attention weights.
        inputs = adapter.inputs_with(model_inputs, adapter.visual_tokens(model_inputs))
    previous = text_cfg._attn_implementation
    adapter.reset_state()
    try:
        model.set_attn_implementation(
            {"text_config": "eager"} if text_cfg is not model.config else "eager"
        )
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, use_cache=False)
        attn = out.attentions[layer]  # (B, H, L, L)
    finally:
        model.set_attn_implementation(
            {"text_config": previous} if text_cfg is not model.config else previous
        )
        adapter.reset_state()

    scores = []
    for i, s in enumerate(slots):
        queries = text[s.row].clone()
        queries[: s.start + s.count] = False
        if not queries.any():
            raise ValueError(f"image {i} (row {s.row}) has no prompt text after it")
        a = attn[s.row, :, queries][:, :, s.start : s.start + s.count]  # (H, q, n_i)
        scores.append(a.float().mean(dim=(0, 1)))
    return scores
