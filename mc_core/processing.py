"""Offline processors for the LVLM families: a word-level tokenizer inside the real processor class.

`build_processor(family, vocab, **image_cfg)` returns the family's own transformers processor
(`LlavaProcessor`, `LlavaNextProcessor`, `Qwen2VLProcessor`, `Qwen2_5_VLProcessor`,
`InternVLProcessor`) built from arguments only: no hub, no download. The tokenizer is a
`tokenizers` WordLevel model (whitespace + punctuation pre-tokenizer, so "what colour is at row 2
col 3 ?" is seven words) wrapped in `PreTrainedTokenizerFast` with the family's special tokens;
the image processor is the `*ImageProcessorPil` variant (torchvision is not installable here).

Chat template (docs/contracts.md): the image(s) go where the message content puts them (the
first user turn); every assistant answer ends with the family's end-of-turn token, and the
generation prompt is exactly how an assistant turn begins, so the rendering of turns 1..k (with
`add_generation_prompt=True`) is a string prefix of turns 1..k+1, and — because every boundary is
whitespace or a special token — its token ids are a prefix too. That is what lets a dialogue reuse
its KV cache turn after turn.

The Qwen and InternVL processors take a video processor, whose auto-mapping needs torchvision;
`_NoVideoMixin` lets them run (and save / load) with `video_processor=None`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLProcessor,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "FAMILIES",
    "build_processor",
    "build_tokenizer",
    "chat_template",
    "load_processor",
    "special_tokens",
]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")

# Words every template emits besides the special tokens (must be in the vocabulary).
_TEMPLATE_WORDS = {
    "llava": ["USER", "ASSISTANT", "SYSTEM", ":"],
    "llava_next": ["USER", "ASSISTANT", "SYSTEM", ":"],
    "qwen2_vl": ["user", "assistant", "system"],
    "qwen2_5_vl": ["user", "assistant", "system"],
    "internvl": ["user", "assistant", "system"],
}

_VICUNA = {
    "bos": "<s>",
    "eos": "</s>",
    "unk": "<unk>",
    "pad": "<pad>",
    "image": "<image>",
    "end_of_turn": "</s>",
}
_QWEN = {
    "bos": "<|im_start|>",  # Qwen has no BOS; generation_config uses eos/pad only.
    "eos": "<|im_end|>",
    "unk": "<unk>",
    "pad": "<|endoftext|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "im_start": "<|im_start|>",
    "end_of_turn": "<|im_end|>",
}
_INTERNVL = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "unk": "<unk>",
    "pad": "<|endoftext|>",
    "image": "<IMG_CONTEXT>",
    "img_start": "<img>",
    "img_end": "</img>",
    "video": "<video>",
    "im_start": "<|im_start|>",
    "end_of_turn": "<|im_end|>",
}
_SPECIALS = {
    "llava": _VICUNA,
    "llava_next": _VICUNA,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "internvl": _INTERNVL,
}


def _check_family(family: str, where: str = "family") -> str:
    if family not in FAMILIES:
        raise ValueError(
            f"{where}={family!r} is not a known family; choose one of {list(FAMILIES)}"
        )
    return family


def special_tokens(family: str) -> dict[str, str]:
    """The family's special tokens by role.

    Args:
        family: one of `FAMILIES`.

    Returns:
        A new dict with at least `bos`, `eos`, `unk`, `pad`, `image` (the placeholder the chat
        text carries) and `end_of_turn` (what closes every assistant answer), plus
        family-specific ones (`vision_start`/`vision_end`/`video` for Qwen,
        `img_start`/`img_end`/`video` for InternVL).
    """
    return dict(_SPECIALS[_check_family(family)])


# Jinja pieces shared by the templates. `content` is a string or a list of {"type": ...} items.
_TEXT = (
    "{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
    "{% endif %}"
)


def _images(placeholder: str) -> str:
    return (
        "{% if m.content is not string %}{% for c in m.content %}"
        f"{{% if c.type == 'image' %}}{placeholder}{{% endif %}}"
        "{% endfor %}{% endif %}"
    )


def chat_template(family: str) -> str:
    """The Jinja chat template of `family` (see the module docstring for its prefix property)."""
    sp = special_tokens(family)
    if family in ("llava", "llava_next"):
        # LLaVA-1.5 / vicuna style: "USER: <image> q ASSISTANT: a</s>USER: q2 ASSISTANT:".
        return (
            "{{ bos_token }}{% for m in messages %}"
            "{% if m.role == 'assistant' %}ASSISTANT: " + _TEXT + "{{ eos_token }}"
            "{% elif m.role == 'system' %}SYSTEM: " + _TEXT + " "
            "{% else %}USER: " + _images(sp["image"] + " ") + _TEXT + " {% endif %}"
            "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        image = sp["vision_start"] + sp["image"] + sp["vision_end"]
    else:
        image = sp["image"] + "\n"
    # ChatML: "<|im_start|>user\n<image>q<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n".
    return (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        + _images(image)
        + _TEXT
        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_tokenizer(family: str, vocab: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the family's special tokens and chat template.

    Args:
        family: one of `FAMILIES`.
        vocab: the words (no whitespace inside a word); the template's role words and
            punctuation are added, duplicates dropped, order kept, so ids are deterministic.

    Returns:
        A `PreTrainedTokenizerFast`, left padding (batched generation), no automatic BOS (the
        template writes it where the family has one). Unknown words map to `unk`.
    """
    sp = special_tokens(family)
    for i, word in enumerate(vocab):
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocab[{i}]={word!r}: words must be non-empty strings without spaces")
    specials = list(dict.fromkeys(sp.values()))
    words = [w for w in dict.fromkeys([*_TEMPLATE_WORDS[family], *vocab]) if w not in specials]
    ids = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=sp["unk"]))
    # Split on whitespace, then isolate every punctuation character: "col 3?" -> col, 3, ?.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    extra = {k + "_token": v for k, v in sp.items() if k not in ("bos", "eos", "unk", "pad")}
    if family == "internvl":
        # InternVLProcessor reads these attribute names from the tokenizer.
        extra.update(
            start_image_token=sp["img_start"],
            end_image_token=sp["img_end"],
            context_image_token=sp["image"],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        unk_token=sp["unk"],
        pad_token=sp["pad"],
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=chat_template(family),
    )
    return tokenizer


class _NoVideoMixin:
    """Lets a processor that takes a video processor run, save and load without one.

    Without torchvision the video auto-mapping cannot be built, so the stock class check and
    `from_pretrained` both fail even for `video_processor=None`.
    """

    _image_processor_cls: type
    video_processor = None

    @classmethod
    def get_attributes(cls):  # noqa: D102
        # Without the video processor as a sub-processor, save_pretrained / to_dict skip it and
        # __init__ (which zips its positional arguments with this list) ignores the None.
        return [a for a in super().get_attributes() if a != "video_processor"]

    def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D102
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def _get_arguments_from_pretrained(cls, path, processor_dict=None, **kwargs):
        kwargs.pop("subfolder", None)
        image_processor = cls._image_processor_cls.from_pretrained(path, **kwargs)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
        return [image_processor, tokenizer, None]


class OfflineQwen2VLProcessor(_NoVideoMixin, Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor."""

    _image_processor_cls = Qwen2VLImageProcessorPil


class OfflineQwen2_5_VLProcessor(_NoVideoMixin, Qwen2_5_VLProcessor):  # noqa: N801
    """`Qwen2_5_VLProcessor` without a video processor."""

    _image_processor_cls = Qwen2VLImageProcessorPil


class OfflineInternVLProcessor(_NoVideoMixin, InternVLProcessor):
    """`InternVLProcessor` without a video processor.

    The stock class forces `crop_to_patches=True` at call time; here the (saved) image processor's
    own setting decides, so a tiny model can use single tiles.
    """

    _image_processor_cls = GotOcr2ImageProcessorPil
    images_kwargs = {}


_PROCESSOR_CLASSES: dict[str, type[ProcessorMixin]] = {
    "LlavaProcessor": LlavaProcessor,
    "LlavaNextProcessor": LlavaNextProcessor,
    "OfflineQwen2VLProcessor": OfflineQwen2VLProcessor,
    "OfflineQwen2_5_VLProcessor": OfflineQwen2_5_VLProcessor,
    "OfflineInternVLProcessor": OfflineInternVLProcessor,
}

# Image-config keys each family accepts (anything else is a typo: ValueError).
_IMAGE_KEYS = {
    "llava": {
        "image_size",
        "patch_size",
        "vision_feature_select_strategy",
        "image_mean",
        "image_std",
    },
    "llava_next": {
        "image_size",
        "patch_size",
        "vision_feature_select_strategy",
        "grid_pinpoints",
        "image_mean",
        "image_std",
    },
    "qwen2_vl": {
        "min_pixels",
        "max_pixels",
        "patch_size",
        "merge_size",
        "temporal_patch_size",
        "image_mean",
        "image_std",
    },
    "internvl": {
        "image_size",
        "patch_size",
        "downsample_ratio",
        "max_patches",
        "min_patches",
        "crop_to_patches",
        "image_mean",
        "image_std",
    },
}
_IMAGE_KEYS["qwen2_5_vl"] = _IMAGE_KEYS["qwen2_vl"]


def _positive_int(cfg: dict[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"image_cfg[{key!r}]={value!r}: expected a positive int")
    return value


def _norm(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("image_mean", "image_std"):
        if key in cfg:
            value = cfg[key]
            if len(value) != 3:
                raise ValueError(f"image_cfg[{key!r}]={value!r}: expected 3 channel values")
            out[key] = [float(v) for v in value]
    return out


def build_processor(family: str, vocab: list[str], **image_cfg: Any) -> ProcessorMixin:
    """The family's real processor, built offline.

    Args:
        family: "llava", "llava_next", "qwen2_vl", "qwen2_5_vl" or "internvl".
        vocab: words of the tokenizer (see `build_tokenizer`).
        **image_cfg: per family (defaults in brackets):
            llava: image_size [336], patch_size [14], vision_feature_select_strategy
                ["default": drop CLS, n = (image_size / patch_size)^2].
            llava_next: the same plus grid_pinpoints [[[2s, s], [s, 2s], [2s, 2s]] for s =
                image_size] (list of [height, width], multiples of image_size).
            qwen2_vl / qwen2_5_vl: min_pixels [56*56], max_pixels [28*28*1280], patch_size [14],
                merge_size [2], temporal_patch_size [2].
            internvl: image_size [448], patch_size [14], downsample_ratio [0.5] (tokens per tile =
                (image_size / patch_size * downsample_ratio)^2), crop_to_patches [True:
                dynamic tiling plus a thumbnail, as the real model], min_patches [1],
                max_patches [12].
            all: image_mean, image_std (3 floats each; CLIP's by default).

    Returns:
        A processor whose `apply_chat_template(messages, add_generation_prompt=True,
        tokenize=False)` renders a dialogue and whose call returns the model inputs.

    Raises:
        ValueError: unknown family, unknown image_cfg key, or an invalid value (named).
    """
    _check_family(family)
    unknown = set(image_cfg) - _IMAGE_KEYS[family]
    if unknown:
        raise ValueError(
            f"image_cfg keys {sorted(unknown)} are not used by family {family!r}; "
            f"expected a subset of {sorted(_IMAGE_KEYS[family])}"
        )
    tokenizer = build_tokenizer(family, vocab)
    template = chat_template(family)
    norm = _norm(image_cfg)

    if family in ("llava", "llava_next"):
        size = _positive_int(image_cfg, "image_size", 336)
        patch = _positive_int(image_cfg, "patch_size", 14)
        if size % patch:
            raise ValueError(
                f"image_cfg['image_size']={size} is not a multiple of patch_size={patch}"
            )
        strategy = image_cfg.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(
                f"image_cfg['vision_feature_select_strategy']={strategy!r}: "
                "expected 'default' or 'full'"
            )
        common = dict(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm
        )
        kwargs = dict(
            patch_size=patch,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,  # CLIP-style towers add a CLS token
            chat_template=template,
            image_token=special_tokens(family)["image"],
        )
        if family == "llava":
            return LlavaProcessor(LlavaImageProcessorPil(**common), tokenizer, **kwargs)
        pinpoints = image_cfg.get(
            "grid_pinpoints", [[2 * size, size], [size, 2 * size], [2 * size, 2 * size]]
        )
        for hw in pinpoints:
            if len(hw) != 2 or any(int(v) <= 0 or int(v) % size for v in hw):
                raise ValueError(
                    f"image_cfg['grid_pinpoints'] entry {hw!r}: expected [height, width], "
                    f"positive multiples of image_size={size}"
                )
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints], **common
        )
        return LlavaNextProcessor(image_processor, tokenizer, **kwargs)

    if family in ("qwen2_vl", "qwen2_5_vl"):
        patch = _positive_int(image_cfg, "patch_size", 14)
        merge = _positive_int(image_cfg, "merge_size", 2)
        temporal = _positive_int(image_cfg, "temporal_patch_size", 2)
        min_pixels = _positive_int(image_cfg, "min_pixels", 56 * 56)
        max_pixels = _positive_int(image_cfg, "max_pixels", 28 * 28 * 1280)
        if min_pixels > max_pixels:
            raise ValueError(f"image_cfg min_pixels={min_pixels} > max_pixels={max_pixels}")
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=temporal,
            **norm,
        )
        cls = OfflineQwen2VLProcessor if family == "qwen2_vl" else OfflineQwen2_5_VLProcessor
        return cls(image_processor, tokenizer, None, chat_template=template)

    # internvl
    size = _positive_int(image_cfg, "image_size", 448)
    patch = _positive_int(image_cfg, "patch_size", 14)
    ratio = float(image_cfg.get("downsample_ratio", 0.5))
    side = size / patch * ratio
    if size % patch or side != int(side) or side <= 0:
        raise ValueError(
            f"image_cfg image_size={size}, patch_size={patch}, downsample_ratio={ratio}: "
            "image_size / patch_size * downsample_ratio must be a positive integer"
        )
    min_patches = _positive_int(image_cfg, "min_patches", 1)
    max_patches = _positive_int(image_cfg, "max_patches", 12)
    if min_patches > max_patches:
        raise ValueError(f"image_cfg min_patches={min_patches} > max_patches={max_patches}")
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        crop_to_patches=bool(image_cfg.get("crop_to_patches", True)),
        min_patches=min_patches,
        max_patches=max_patches,
        **norm,
    )
    return OfflineInternVLProcessor(
        image_processor, tokenizer, None, image_seq_length=int(side) ** 2, chat_template=template
    )


def load_processor(path: str | os.PathLike) -> ProcessorMixin:
    """Load a processor saved by `save_pretrained` (of one built here), offline.

    Args:
        path: the directory `processor.save_pretrained(path)` wrote.

    Raises:
        ValueError: no processor config there, or a processor class not built by this module.
    """
    config = os.path.join(os.fspath(path), "processor_config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{config}: no processor_config.json (not a saved processor)")
    with open(config, encoding="utf-8") as f:
        name = json.load(f).get("processor_class")
    if name not in _PROCESSOR_CLASSES:
        raise ValueError(
            f"{config}: processor_class={name!r} is not one of {sorted(_PROCESSOR_CLASSES)}"
        )
    return _PROCESSOR_CLASSES[name].from_pretrained(os.fspath(path), local_files_only=True)
