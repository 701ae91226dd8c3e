"""Adapters wire compression into stock LVLMs; `for_model(model)` picks the model's family's.

    adapter = for_model(model)                         # positions: the family's default
    x = adapter.visual_tokens(inputs)                  # list of [n_i, d]
    y, P = compressor(x, adapter.contexts(inputs, compressor.needs - {"prompt_attention"}))
    out = model(**adapter.inputs_with(inputs, y, P=P))  # or model.generate(**...)

The adapter class of each family and its position default ("packed" or "source", see
`Adapter`) are declared by the family's descriptor in `mc_core.families`. `prompt_attention`
gives FastV its scores (attention at one LLM layer from the first turn's prompt to each image's
tokens).
"""

from __future__ import annotations

from mc_core.adapters.base import POSITIONS, Adapter, prompt_attention

__all__ = [
    "POSITIONS",
    "Adapter",
    "available",
    "for_model",
    "prompt_attention",
    "supported_classes",
]


def available() -> list[str]:
    """Families an adapter exists for (every registered family)."""
    from mc_core import families

    return families.available()


def supported_classes() -> list[str]:
    """Model class names `for_model` accepts."""
    from mc_core import families

    return sorted(f.model_class.__name__ for f in families.all_families())


def for_model(model, *, positions: str | None = None) -> Adapter:
    """The adapter of `model`'s family.

    Args:
        model: a stock transformers LVLM of a registered family.
        positions: "packed" or "source" (see `Adapter`); None: the family's default.

    Raises:
        ValueError: no family for this model class (the message lists the families and the
            supported classes), or an unknown `positions`.
    """
    from mc_core import families

    fam = families.for_model(model)
    return fam.adapter_class(model, positions=fam.positions if positions is None else positions)
