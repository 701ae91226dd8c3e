"""Adapters wire compression into stock LVLMs, one `Adapter` subclass per family.

    adapter = families.adapter_for(model)              # mc_core.models.families
    x = adapter.visual_tokens(inputs)                  # list of [n_i, d]
    y, P = compressor(x, adapter.contexts(inputs, compressor.needs - PROMPT_FIELDS))
    out = model(**adapter.inputs_with(inputs, y, P=P))  # or model.generate(**...)

Which adapter class a model gets, and its position default ("packed" or "source", see
`Adapter`), is declared by the family's descriptor: the family registry does every lookup, so
this package never imports it. `prompt_attention` gives FastV its scores (attention at one LLM
layer from the first turn's prompt to each image's tokens), `prompt_embeddings` CDPruner its
instruction.
"""

from __future__ import annotations

from mc_core.models.adapters.base import POSITIONS, Adapter
from mc_core.models.adapters.prompt_attention import prompt_attention, prompt_embeddings

__all__ = ["POSITIONS", "Adapter", "prompt_attention", "prompt_embeddings"]
