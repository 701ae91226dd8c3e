"""Real LVLM shapes for benchmarking, built from configs with random weights (no downloads).

Each `ArchShape` holds the published dimensions of one checkpoint (LLaVA-1.5-7B, LLaVA-NeXT-7B,
Qwen2-VL-7B) and a `cpu` variant that shrinks the LLM and the vision tower but keeps the image
geometry, hence the number of visual tokens: the ratio that compression changes. Timing needs
the right shapes, not trained weights, so the model is random and built directly on the target
device in the target dtype (no fp32 CPU copy, no `.to()`), which makes a 7B build take seconds
on a GPU.

Inputs are synthetic: random pixel values and random text token ids with the image
placeholders where the family's processor would put them, in the lengths of a real chat prompt
(`PromptShape`). No tokenizer or processor is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

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
        family: adapter family ("llava", "llava_next", "qwen2_vl").
        reference: the HF checkpoint whose config these numbers copy.
        text: LLM config fields at real size.
        vision: vision tower config fields at real size.
        cpu_text: overrides of `text` for the "cpu" scale.
        cpu_vision: overrides of `vision` for the "cpu" scale.
        image_size: (height, width) of the benchmark image in pixels.
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
        tiny = _TINY_QWEN_VISION if self.family == "qwen2_vl" else _TINY_CLIP
        return {**self.vision, **tiny}


# LLaVA-1.5 / NeXT use Vicuna-7B (Llama-2 7B dims) with llava-hf's padded vocabulary.
_VICUNA_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
# CLIP ViT-L/14 at 336 px: 24x24 = 576 patches (+ CLS).
_CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
# CPU scale: an LLM a 2-core machine prefills 600-3000 tokens with in seconds; head_dim stays 64+.
_CPU_TEXT = dict(
    hidden_size=1024,
    intermediate_size=2752,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
)
_CPU_CLIP = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
)
# Tiny scale is for tests only (keeps the real image geometry, hence the real token counts).
_TINY_TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_TINY_QWEN_VISION = dict(depth=2, embed_dim=32, num_heads=2)

ARCHS: dict[str, ArchShape] = {
    "llava-1.5-7b": ArchShape(
        name="llava-1.5-7b",
        family="llava",
        reference="llava-hf/llava-1.5-7b-hf",
        text=_VICUNA_7B,
        vision=_CLIP_L_336,
        cpu_text=_CPU_TEXT,
        cpu_vision=_CPU_CLIP,
        image_size=(336, 336),
    ),
    "llava-next-7b": ArchShape(
        name="llava-next-7b",
        family="llava_next",
        reference="llava-hf/llava-v1.6-vicuna-7b-hf",
        text=_VICUNA_7B,
        vision=_CLIP_L_336,
        cpu_text=_CPU_TEXT,
        cpu_vision=_CPU_CLIP,
        # anyres: 672x672 picks the 2x2 grid: base 576 + 48x48 crop tokens + 48 newlines.
        image_size=(672, 672),
        extra=dict(
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        ),
    ),
    "qwen2-vl-7b": ArchShape(
        name="qwen2-vl-7b",
        family="qwen2_vl",
        reference="Qwen/Qwen2-VL-7B-Instruct",
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        # head_dim 64 at cpu scale: mrope_section is derived from head_dim below.
        cpu_text=dict(_CPU_TEXT, vocab_size=152064, num_key_value_heads=4),
        cpu_vision=dict(depth=4, embed_dim=256, num_heads=4),
        # 672x672 -> 48x48 patches -> 24x24 = 576 tokens after the 2x2 merge.
        image_size=(672, 672),
    ),
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


def build_config(arch: ArchShape, scale: str):
    """The transformers config of `arch` at `scale` (sdpa attention)."""
    text = arch.text_fields(scale)
    vision = arch.vision_fields(scale)
    if arch.family in ("llava", "llava_next"):
        text_cfg = LlamaConfig(**text)
        vision_cfg = CLIPVisionConfig(**vision)
        # llava-hf puts <image> right after the 32000-token Llama vocabulary; tiny vocabularies
        # use their last id.
        image_token = 32000 if text_cfg.vocab_size > 32000 else text_cfg.vocab_size - 1
        common = dict(
            text_config=text_cfg,
            vision_config=vision_cfg,
            image_token_id=image_token,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
            tie_word_embeddings=False,
        )
        if arch.family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, **arch.extra)
    if arch.family == "qwen2_vl":
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # mrope splits head_dim // 2 rotary frequencies into (temporal, height, width): Qwen2-VL
        # uses [16, 24, 24] of 64; keep those proportions for other head sizes.
        half = head_dim // 2
        t_sec = half // 4
        h_sec = (half - t_sec) // 2
        mrope = [t_sec, h_sec, half - t_sec - h_sec]
        text_cfg = dict(
            text,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        )
        vision_cfg = dict(vision, hidden_size=text["hidden_size"])
        vocab = text["vocab_size"]
        if vocab > 151656:
            ids = {}  # the real special ids fit
        else:  # tiny vocabulary: the last four ids play the vision specials
            # bos/eos inside the vocabulary too (the config warns otherwise).
            text_cfg.update(bos_token_id=vocab - 5, eos_token_id=vocab - 6)
            ids = dict(
                image_token_id=vocab - 1,
                video_token_id=vocab - 2,
                vision_start_token_id=vocab - 3,
                vision_end_token_id=vocab - 4,
            )
        return Qwen2VLConfig(text_config=text_cfg, vision_config=vision_cfg, **ids)
    raise ValueError(f"arch {arch.name!r} has unknown family {arch.family!r}")


_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}


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
        model = _CLASSES[arch.family]._from_config(config, dtype=dtype, attn_implementation="sdpa")
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
        image_sizes (LLaVA-NeXT) or image_grid_thw + mm_token_type_ids (Qwen2-VL), on the
        model's device; pixel values in the model's dtype.
    """
    cfg = model.config
    device, dtype = model.device, model.dtype
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    h, w = arch.image_size
    extra: dict = {}
    if arch.family == "llava":
        size = cfg.vision_config.image_size
        pixel_values = torch.randn(1, 3, size, size, generator=gen)
        n = cfg.image_seq_length
    elif arch.family == "llava_next":
        size = cfg.vision_config.image_size
        # 2x2 grid crops + the resized base image (the processor's layout for a 672x672 image)
        rows, cols = h // size, w // size
        pixel_values = torch.randn(1, 1 + rows * cols, 3, size, size, generator=gen)
        extra["image_sizes"] = torch.tensor([[h, w]], device=device)
        n = None  # counted from the packed features below
    elif arch.family == "qwen2_vl":
        vc = cfg.vision_config
        gh, gw = h // vc.patch_size, w // vc.patch_size
        channels = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixel_values = torch.randn(gh * gw, channels, generator=gen)
        extra["image_grid_thw"] = torch.tensor([[1, gh, gw]], device=device)
        n = gh * gw // vc.spatial_merge_size**2
    else:
        raise ValueError(f"arch {arch.name!r} has unknown family {arch.family!r}")
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    if n is None:
        with torch.no_grad():
            feats = model.get_image_features(
                pixel_values=pixel_values, image_sizes=extra["image_sizes"]
            )
        pooled = getattr(feats, "pooler_output", feats)
        n = int(pooled[0].shape[0])

    image_id = cfg.image_token_id
    before = _text_ids(prompt.before_image, vocab, gen)
    after = _text_ids(prompt.after_image, vocab, gen)
    image = torch.full((n,), image_id, dtype=torch.long)
    if arch.family == "qwen2_vl":
        image = torch.cat(
            [
                torch.tensor([cfg.vision_start_token_id]),
                image,
                torch.tensor([cfg.vision_end_token_id]),
            ]
        )
    ids = torch.cat([before, image, after])[None].to(device)  # (1, L)
    out = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixel_values,
        **extra,
    )
    if arch.family == "qwen2_vl":
        out["mm_token_type_ids"] = (ids == image_id).long()
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
