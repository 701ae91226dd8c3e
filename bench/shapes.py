"""Real LVLM shapes for benchmarking, built from configs with random weights (no downloads).

The shapes come from the family descriptors (`mc_core.models.families`, each family's `bench`): the
published dimensions of one checkpoint (LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2-VL-7B) and a `cpu`
variant that shrinks the LLM and the vision tower but keeps the image geometry, hence the
number of visual tokens: the ratio that compression changes. Timing needs the right shapes, not
trained weights, so the model is random and built directly on the target device in the target
dtype (no fp32 CPU copy, no `.to()`), which makes a 7B build take seconds on a GPU.

Inputs are synthetic: random pixel values and random text token ids with the image
placeholders where the family's processor would put them (the descriptor's `bench_inputs`), in
the lengths of a real chat prompt (`PromptShape`). No tokenizer or processor is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from mc_core.models import families

SCALES = ("cpu", "real", "tiny")


@dataclass(frozen=True)
class PromptShape:
    """Token counts of a three-turn chat around one image (LLaVA-1.5 chat template lengths).

    Attributes:
        before_image: system prompt and "USER:" before the image placeholders.
        after_image: first question and "ASSISTANT:" after them.
        later_turn: answer separator, a follow-up question and "ASSISTANT:" (turns 2, 3, ...).
    """

    before_image: int = 35
    after_image: int = 21
    later_turn: int = 24


@dataclass(frozen=True)
class ArchShape:
    """One LVLM checkpoint's shapes, at real size and scaled down for CPU.

    Attributes:
        name: CLI name, e.g. "llava-1.5-7b".
        family: the family descriptor's name.
        reference: the HF checkpoint whose config these numbers copy.
        text: LLM config fields at real size.
        vision: vision tower config fields at real size.
        cpu_text: overrides of `text` for the "cpu" scale.
        cpu_vision: overrides of `vision` for the "cpu" scale.
        image_size: (height, width) of the benchmark image in pixels.
        extra: further config fields (e.g. anyres pinpoints).
        tiny_vision: overrides of `vision` for the "tiny" scale.
    """

    name: str
    family: str
    reference: str
    text: dict
    vision: dict
    cpu_text: dict
    cpu_vision: dict
    image_size: tuple[int, int]
    extra: dict = field(default_factory=dict)
    tiny_vision: dict = field(default_factory=dict)

    def text_fields(self, scale: str) -> dict:
        """LLM config fields at `scale` ("real", "cpu" or "tiny")."""
        check_scale(scale)
        if scale == "real":
            return dict(self.text)
        if scale == "cpu":
            return {**self.text, **self.cpu_text}
        return {**self.text, **_TINY_TEXT}

    def vision_fields(self, scale: str) -> dict:
        """Vision tower config fields at `scale`."""
        check_scale(scale)
        if scale == "real":
            return dict(self.vision)
        if scale == "cpu":
            return {**self.vision, **self.cpu_vision}
        return {**self.vision, **self.tiny_vision}


# Tiny scale is for tests only (keeps the real image geometry, hence the real token counts).
_TINY_TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)

ARCHS: dict[str, ArchShape] = {
    name: ArchShape(
        name=name,
        family=fam.name,
        reference=s.reference,
        text=s.text,
        vision=s.vision,
        cpu_text=s.cpu_text,
        cpu_vision=s.cpu_vision,
        image_size=s.image_size,
        extra=s.extra,
        tiny_vision=s.tiny_vision,
    )
    for fam in families.all_families()
    for name, s in fam.bench.items()
}


def check_scale(scale: str, *, where: str = "scale") -> str:
    """Return `scale` if known, else raise ValueError naming `where`."""
    if scale not in SCALES:
        raise ValueError(f"{where}={scale!r} is not one of {list(SCALES)}")
    return scale


def get_arch(name: str, *, where: str = "--arch") -> ArchShape:
    """Look up an `ArchShape` by name; ValueError naming `where` and the known names."""
    if name not in ARCHS:
        raise ValueError(f"{where}={name!r} is not one of {sorted(ARCHS)}")
    return ARCHS[name]


def _family(arch: ArchShape):
    return families.get(arch.family, where=f"arch {arch.name!r} family")


def build_config(arch: ArchShape, scale: str):
    """The transformers config of `arch` at `scale` (sdpa attention)."""
    fam = _family(arch)
    shape = fam.bench[arch.name]
    return fam.bench_config(shape, arch.text_fields(scale), arch.vision_fields(scale))


def build_model(
    arch: ArchShape,
    scale: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PreTrainedModel:
    """Random-weight model of `arch` at `scale`, created on `device` in `dtype`, eval mode, sdpa.

    Parameters are allocated and initialised on the target device (under `torch.device`), so a
    7B model never exists as a CPU fp32 copy.
    """
    config = build_config(arch, scale)
    torch.manual_seed(seed)
    with torch.device(device):
        model = _family(arch).model_class._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval().requires_grad_(False)


def _text_ids(count: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    # Ordinary word ids: stay clear of the low specials and of the image / vision ids at the top.
    return torch.randint(10, max(11, min(vocab - 8, 32000)), (count,), generator=gen)


def make_inputs(
    model: PreTrainedModel,
    arch: ArchShape,
    prompt: PromptShape = PromptShape(),
    *,
    seed: int = 0,
) -> dict:
    """Synthetic first-turn model inputs (batch 1) as the family's processor would return them.

    Returns:
        dict with input_ids [1, L], attention_mask [1, L], pixel_values and, per family,
        the family's extras (image_sizes for LLaVA-NeXT, image_grid_thw + mm_token_type_ids
        for Qwen), on the model's device; pixel values in the model's dtype.
    """
    fam = _family(arch)
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    pixel_values, extra, image_run = fam.bench_inputs(model, fam.bench[arch.name], gen)
    before = _text_ids(prompt.before_image, vocab, gen)
    after = _text_ids(prompt.after_image, vocab, gen)
    image = torch.tensor(image_run, dtype=torch.long)
    ids = torch.cat([before, image, after])[None].to(device)  # (1, L)
    out = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixel_values,
        **extra,
    )
    if fam.token_types:
        out["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    return out


def turn_ids(
    model: PreTrainedModel, count: int, *, seed: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """Random text ids [1, count] for a follow-up turn (no image)."""
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    return _text_ids(count, vocab, gen)[None].to(device or model.device)


def visual_token_count(inputs: dict, image_token_id: int) -> int:
    """Number of image placeholders in `inputs["input_ids"]`."""
    return int((inputs["input_ids"] == image_token_id).sum())
