"""Processors by family name: build one offline, load a saved one, read a family's special
tokens. The family registry does the lookup; `mc_core.models.processing` holds the pieces.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import PreTrainedTokenizerFast, ProcessorMixin

from mc_core.models import families
from mc_core.models.processing import word_tokenizer

__all__ = [
    "build_processor",
    "build_tokenizer",
    "chat_template",
    "load_processor",
    "special_tokens",
]


def _family(name: str):
    return families.get(name)


def special_tokens(family: str) -> dict[str, str]:
    """The family's special tokens by role.

    Args:
        family: a registered family (`mc_core.models.families.available()`).

    Returns:
        A new dict with at least `bos`, `eos`, `unk`, `pad`, `image` (the placeholder the chat
        text carries) and `end_of_turn` (what closes every assistant answer), plus
        family-specific ones (e.g. `vision_start`/`vision_end`/`video` for Qwen).
    """
    return dict(_family(family).specials)


def chat_template(family: str) -> str:
    """The Jinja chat template of `family` (see the module docstring for its prefix property)."""
    return _family(family).chat_template()


def build_tokenizer(family: str, vocab: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the family's special tokens and chat template
    (`mc_core.models.processing.word_tokenizer`)."""
    return word_tokenizer(_family(family), vocab)


def build_processor(family: str, vocab: list[str], **image_cfg: Any) -> ProcessorMixin:
    """The family's real processor, built offline.

    Args:
        family: a registered family (`mc_core.models.families.available()`).
        vocab: words of the tokenizer (see `build_tokenizer`).
        **image_cfg: image geometry; the keys each family accepts and their defaults are in its
            descriptor's `build_processor` (`mc_core/models/families/<family>.py`). All families
            take
            image_mean, image_std (3 floats each; CLIP's by default).

    Returns:
        A processor whose `apply_chat_template(messages, add_generation_prompt=True,
        tokenize=False)` renders a dialogue and whose call returns the model inputs.

    Raises:
        ValueError: unknown family, unknown image_cfg key, or an invalid value (named).
    """
    fam = _family(family)
    unknown = set(image_cfg) - fam.image_keys
    if unknown:
        raise ValueError(
            f"image_cfg keys {sorted(unknown)} are not used by family {family!r}; "
            f"expected a subset of {sorted(fam.image_keys)}"
        )
    return fam.build_processor(build_tokenizer(family, vocab), dict(image_cfg))


def load_processor(path: str | os.PathLike) -> ProcessorMixin:
    """Load a processor saved by `save_pretrained` (of one built here), offline.

    Args:
        path: the directory `processor.save_pretrained(path)` wrote.

    Raises:
        ValueError: no processor config there, or a processor class no family builds.
    """
    config = os.path.join(os.fspath(path), "processor_config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{config}: no processor_config.json (not a saved processor)")
    with open(config, encoding="utf-8") as f:
        name = json.load(f).get("processor_class")
    classes = {f.processor_class.__name__: f.processor_class for f in families.all_families()}
    if name not in classes:
        raise ValueError(f"{config}: processor_class={name!r} is not one of {sorted(classes)}")
    return classes[name].from_pretrained(os.fspath(path), local_files_only=True)
