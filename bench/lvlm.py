"""A random-weight LVLM of a benchmark shape that the library can train and chat with.

`bench.shapes` builds models for timing with synthetic input ids, no processor. The training
loop and `Conversation` need a processor: they render dialogues through its chat template and
read its image placeholders. This module pairs a benchmark shape with the family's offline
word-level processor (the synthetic world's vocabulary, the real checkpoint's image geometry) and
points the model's special-token ids at that tokenizer's, so that real widths (hidden size,
MLP, heads, vocabulary of the LM head) meet real visual-token counts (576 for LLaVA-1.5 at
336 px and for Qwen2-VL at 672 px) and real library code paths, without a download.

The vocabulary of the model keeps its real size (32,064 / 152,064 rows of embedding and LM
head: the logits and the KL cost what they cost at real size); the tokenizer uses only its
first few dozen ids.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from bench import shapes
from mc_core.models import families
from mc_core.models.processors import build_processor

__all__ = ["build", "dialogues", "image_side"]


def _fam(arch: shapes.ArchShape):
    return families.get(arch.family, where=f"arch {arch.name!r} family")


def image_side(arch: shapes.ArchShape) -> int:
    """Side in pixels of the square benchmark image of `arch` (336 LLaVA-1.5, 672 Qwen2-VL)."""
    h, w = arch.image_size
    if h != w:
        raise ValueError(f"arch {arch.name!r}: image_size={arch.image_size} is not square")
    return int(h)


def _processor(arch: shapes.ArchShape) -> ProcessorMixin:
    """The family's offline processor with the real checkpoint's image settings."""
    from mc_core.data.synthetic import vocabulary

    fam = _fam(arch)
    if arch.name not in fam.real:
        raise ValueError(
            f"arch {arch.name!r} has no real checkpoint record in family {fam.name!r} "
            f"(knows {sorted(fam.real)}): its processor settings are unknown"
        )
    return build_processor(fam.name, vocabulary(), **fam.real[arch.name].processor_kwargs)


def _adopt_ids(config, fam, tokenizer) -> None:
    """Point every special-token id of `config` at `tokenizer`'s (they play the same roles)."""
    ids = {
        f"{role}_token_id": tokenizer.convert_tokens_to_ids(tok)
        for role, tok in fam.specials.items()
    }
    text = config.get_text_config()
    for cfg in {id(config): config, id(text): text}.values():
        for key, value in ids.items():
            if hasattr(cfg, key):
                setattr(cfg, key, value)


def build(
    arch_name: str,
    scale: str,
    *,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Random-weight model of `arch_name` at `scale` with overrides, and its offline processor.

    Args:
        arch_name: a `bench.shapes.ARCHS` name ("llava-1.5-7b", "qwen2-vl-7b", ...).
        scale: "real", "cpu" or "tiny" (`bench.shapes`).
        text: LLM config fields over the scale's (e.g. ``{"num_hidden_layers": 2}``).
        vision: vision tower config fields over the scale's.
        device: where the weights are created (directly, no CPU copy).
        dtype: their dtype.
        seed: torch seed of the random init.

    Returns:
        ``(model, processor)``: eval mode, no gradients, SDPA attention.
    """
    arch = shapes.get_arch(arch_name, where="arch")
    fam = _fam(arch)
    processor = _processor(arch)
    config = fam.bench_config(
        fam.bench[arch.name],
        {**arch.text_fields(scale), **(text or {})},
        {**arch.vision_fields(scale), **(vision or {})},
    )
    _adopt_ids(config, fam, processor.tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = fam.model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model.eval().requires_grad_(False), processor


def dialogues(arch_name: str, n: int, *, seed: int = 0):
    """`n` synthetic 3-turn dialogues whose images have the benchmark side of `arch_name`."""
    from mc_core.data.synthetic import WorldConfig, generate

    side = image_side(shapes.get_arch(arch_name, where="arch"))
    return generate(n, seed, WorldConfig(image_size=side))
