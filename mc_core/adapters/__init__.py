"""One adapter per LVLM family; `for_model(model)` picks it by the model's class.

    adapter = for_model(model)
    x = adapter.visual_tokens(inputs)                  # list of [n_i, d]
    y, P = compressor(x, adapter.contexts(inputs, compressor.needs - {"prompt_attention"}))
    out = model(**adapter.inputs_with(inputs, y))      # or model.generate(**...)

`prompt_attention` gives FastV its scores (attention at one LLM layer from the first turn's
prompt to each image's tokens).
"""

from __future__ import annotations

from mc_core.adapters.base import Adapter, prompt_attention
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

