"""Offline processors for the LVLM families: a word-level tokenizer inside the real processor class.

`mc_core.models.processors.build_processor(family, vocab, **image_cfg)` returns the family's own
transformers processor
(the class its descriptor in `mc_core.models.families` names) built from arguments only: no hub, no
download. The tokenizer is a `tokenizers` WordLevel model (whitespace + punctuation
pre-tokenizer, so "what colour is at row 2 col 3 ?" is seven words) wrapped in
`PreTrainedTokenizerFast` with the family's special tokens; the image processor is the
`*ImageProcessorPil` variant (torchvision is not installable here).

Chat template (docs/contracts.md): the image(s) go where the message content puts them (the
first user turn); every assistant answer ends with the family's end-of-turn token, and the
generation prompt is exactly how an assistant turn begins, so the rendering of turns 1..k (with
`add_generation_prompt=True`) is a string prefix of turns 1..k+1, and — because every boundary is
whitespace or a special token — its token ids are a prefix too. That is what lets a dialogue reuse
its KV cache turn after turn. `vicuna_template` and `chatml_template` build the two styles the
descriptors use.

Processors that take a video processor need torchvision for its auto-mapping; `NoVideoMixin`
lets them run (and save / load) with `video_processor=None`.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "NoVideoMixin",
    "chatml_template",
    "norm_cfg",
    "positive_int",
    "vicuna_template",
    "word_tokenizer",
]


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


def vicuna_template(image: str) -> str:
    """LLaVA-1.5 / vicuna style: "USER: <image> q ASSISTANT: a</s>USER: q2 ASSISTANT:"."""
    return (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'assistant' %}ASSISTANT: " + _TEXT + "{{ eos_token }}"
        "{% elif m.role == 'system' %}SYSTEM: " + _TEXT + " "
        "{% else %}USER: " + _images(image + " ") + _TEXT + " {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def chatml_template(image: str) -> str:
    """ChatML: "<|im_start|>user\\n<image>q<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n",
    with `image` the markup written for each image item."""
    return (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        + _images(image)
        + _TEXT
        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def word_tokenizer(fam, vocab: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the family's special tokens and chat template.

    Args:
        fam: the family descriptor (`mc_core.models.families.Family`).
        vocab: the words (no whitespace inside a word); the template's role words and
            punctuation are added, duplicates dropped, order kept, so ids are deterministic.

    Returns:
        A `PreTrainedTokenizerFast`, left padding (batched generation), no automatic BOS (the
        template writes it where the family has one). Unknown words map to `unk`.
    """
    sp = dict(fam.specials)
    for i, word in enumerate(vocab):
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocab[{i}]={word!r}: words must be non-empty strings without spaces")
    specials = list(dict.fromkeys(sp.values()))
    words = [w for w in dict.fromkeys([*fam.template_words, *vocab]) if w not in specials]
    ids = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=sp["unk"]))
    # Split on whitespace, then isolate every punctuation character: "col 3?" -> col, 3, ?.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    extra = {k + "_token": v for k, v in sp.items() if k not in ("bos", "eos", "unk", "pad")}
    extra.update(fam.tokenizer_extras())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        unk_token=sp["unk"],
        pad_token=sp["pad"],
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=fam.chat_template(),
    )


class NoVideoMixin:
    """Lets a processor that takes a video processor run, save and load without one.

    Without torchvision the video auto-mapping cannot be built, so the stock class check and
    `from_pretrained` both fail even for `video_processor=None`. Subclasses set
    `_image_processor_cls`.
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


def positive_int(cfg: dict[str, Any], key: str, default: int) -> int:
    """`cfg[key]` (or `default`) as a positive int; ValueError naming the key otherwise."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"image_cfg[{key!r}]={value!r}: expected a positive int")
    return value


def norm_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `image_mean` / `image_std` entries of `cfg`, checked (3 floats each)."""
    out = {}
    for key in ("image_mean", "image_std"):
        if key in cfg:
            value = cfg[key]
            if len(value) != 3:
                raise ValueError(f"image_cfg[{key!r}]={value!r}: expected 3 channel values")
            out[key] = [float(v) for v in value]
    return out
