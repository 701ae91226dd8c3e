"""Local Hugging Face snapshots of every real LVLM family, built offline for the tests.

`build_snapshot(family, root)` writes a folder laid out like a hub checkpoint of the family:
random tiny weights of the family's real model class (`save_pretrained`, safetensors), a
byte-level BPE tokenizer trained here on a small corpus (the synthetic world's vocabulary, the
GQA / VQAv2 fixture questions and answers, the short-answer instruction, the template's words)
with the family's special tokens, a chat template in the family's released style (llava-hf's
for LLaVA-1.5 / NeXT, ChatML with the default system turn for Qwen2-VL / Qwen2.5-VL, InternVL3-hf's
ChatML) and the family's real processor and image processor (`save_pretrained`). Sizes are the
descriptor's `test` spec, so a snapshot is < 1 MB and builds in about a second.

    folder = build_snapshot("qwen2_vl", tmp_path)
    model, processor = load_snapshot(folder)          # offline; what the tests use
    families.for_config(folder).name == "qwen2_vl"

Loading: `AutoProcessor.from_pretrained(folder, local_files_only=True)` and
`AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)` load the LLaVA
snapshots as they are. Qwen2-VL, Qwen2.5-VL and InternVL processors also own a video processor,
which transformers builds only with torchvision (not installable here): their
`processor_config.json` names the stock class (as a released checkpoint does), and
`load_processor` falls back to the descriptor's `processor_class` (the stock class minus the
video processor, `mc_core.models.processing.NoVideoMixin`) when the stock one cannot be built.

The conftest fixture `hf_snapshot(family) -> Path` caches one snapshot per family per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast

from mc_core.models import families

__all__ = [
    "FAMILIES",
    "SHORT_ANSWER",
    "build_snapshot",
    "chat_template",
    "corpus",
    "load_model",
    "load_processor",
    "load_snapshot",
    "train_tokenizer",
]

# Every registered family has a real transformers class: all of them get snapshots.
FAMILIES: tuple[str, ...] = tuple(families.available())

# LLaVA's GQA / VQAv2 evaluation prompt (llava/eval/*: "\nAnswer the question using a single
# word or phrase."), part of the corpus so the tokenizer has merges for it.
SHORT_ANSWER = "Answer the question using a single word or phrase."

# Vocabulary budget on top of the 256 byte symbols: small enough that rare fixture answers
# ("umbrella") split into several tokens, so multi-token answers are exercised.
BPE_MERGES = 320

_FIXTURES = Path(__file__).parent / "fixtures"

# llava-hf/llava-1.5-7b-hf's template (also llava-v1.6-vicuna-7b-hf's): "USER: <image>\nq
# ASSISTANT: a USER: ...". No BOS in it (the tokenizer adds it) and no end token after an answer.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct's (and Qwen2.5-VL's) template: ChatML with a default system turn.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# OpenGVLab/InternVL3-*-hf's template: ChatML, "<IMG_CONTEXT>\n" per image, default system turn.
INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
INTERNVL_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
    + INTERNVL_SYSTEM
    + "<|im_end|>\n"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEMPLATES = {
    "llava": LLAVA_TEMPLATE,
    "llava_next": LLAVA_TEMPLATE,
    "qwen2_vl": QWEN_TEMPLATE,
    "qwen2_5_vl": QWEN_TEMPLATE,
    "internvl": INTERNVL_TEMPLATE,
}
# Families whose released tokenizer prepends BOS itself (Llama's): the template writes none.
_ADDS_BOS = frozenset({"llava", "llava_next"})


def _family(family: str):
    fam = families.get(family, where="build_snapshot family")
    if family not in _TEMPLATES:
        raise ValueError(
            f"family={family!r} has no snapshot chat template; have {sorted(_TEMPLATES)}"
        )
    return fam


def chat_template(family: str) -> str:
    """The released-style chat template of `family`."""
    _family(family)
    return _TEMPLATES[family]


def _fixture_texts() -> list[str]:
    texts: list[str] = []
    gqa = json.loads((_FIXTURES / "gqa" / "testdev_balanced_questions.json").read_text())
    for q in gqa.values():
        texts += [q["question"], q["answer"], q.get("fullAnswer", "")]
    vqa = _FIXTURES / "vqav2"
    questions = json.loads((vqa / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    texts += [q["question"] for q in questions["questions"]]
    notes = json.loads((vqa / "v2_mscoco_val2014_annotations.json").read_text())
    for ann in notes["annotations"]:
        texts += [ann["multiple_choice_answer"], *(a["answer"] for a in ann["answers"])]
    return [t for t in texts if t]


def corpus() -> list[str]:
    """The tokenizer's training text: world vocabulary, fixture questions / answers, prompts."""
    from mc_core.data.synthetic import vocabulary

    words = vocabulary()
    lines = [" ".join(words), *(f"what {w} is at row 1 column 2 ?" for w in words)]
    lines += _fixture_texts()
    lines += [SHORT_ANSWER, "USER: ASSISTANT: SYSTEM:", "system user assistant"]
    lines += ["You are a helpful assistant.", INTERNVL_SYSTEM, "Picture 1: Video 1:"]
    # Repeated so the trainer's pair counts favour these words over random byte pairs.
    return lines * 4


def train_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus()` with `family`'s special tokens.

    Byte-level: any text encodes (no unknown token is ever produced) and decoding restores it,
    as for the released Qwen / InternVL tokenizers; LLaVA's SentencePiece Llama tokenizer is
    stood in for by the same model plus its automatic BOS.
    """
    fam = _family(family)
    sp = dict(fam.specials)
    specials = list(dict.fromkeys(sp.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + BPE_MERGES,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family in _ADDS_BOS:
        bos = sp["bos"]
        template = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    extra = {k + "_token": v for k, v in sp.items() if k not in ("bos", "eos", "unk", "pad")}
    extra.update(fam.tokenizer_extras())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"] if family in _ADDS_BOS else None,
        eos_token=sp["eos"],
        unk_token=sp["unk"] if family in _ADDS_BOS else None,
        pad_token=sp["pad"],
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=_TEMPLATES[family],
    )


def build_snapshot(family: str, root: str | Path, *, seed: int = 0) -> Path:
    """Write the snapshot of `family` to `root/<family>` and return that folder.

    Args:
        family: a registered family (`FAMILIES`).
        root: parent folder (created); an existing `root/<family>` is overwritten.
        seed: torch seed of the random weights (same seed, same weights).

    Returns:
        The folder: config.json, generation_config.json, model.safetensors, tokenizer files,
        chat_template.jinja and the processor / image-processor configs.
    """
    fam = _family(family)
    spec = fam.test
    tokenizer = train_tokenizer(family)
    processor = fam.build_processor(tokenizer, dict(spec.image_cfg))
    processor.chat_template = _TEMPLATES[family]
    config = fam.tiny_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fam.model_class(config).eval()
    eos = [tokenizer.convert_tokens_to_ids(fam.specials[r]) for r in ("end_of_turn", "eos")]
    gen = model.generation_config
    gen.eos_token_id = list(dict.fromkeys(eos)) if len(set(eos)) > 1 else eos[0]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    folder = Path(root) / family
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    _name_stock_processor(folder, fam)
    return folder


def _name_stock_processor(folder: Path, fam) -> None:
    # A released checkpoint names the stock processor class, not the offline subclass.
    path = folder / "processor_config.json"
    cfg = json.loads(path.read_text())
    cfg["processor_class"] = fam.stock_processor_class.__name__
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_processor(folder: str | Path):
    """The snapshot's processor, offline: `AutoProcessor` where transformers can build the stock
    class, else the family's `processor_class` (stock class without its video processor)."""
    folder = Path(folder)
    fam = families.for_config(folder)
    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ImportError, AttributeError) as err:
        # Only the missing video processor (torchvision) is forgiven.
        if fam.processor_class is fam.stock_processor_class or "video" not in str(err).lower():
            raise
    return fam.processor_class.from_pretrained(folder, local_files_only=True)


def load_model(folder: str | Path, *, attn_implementation: str = "sdpa"):
    """The snapshot's model through `AutoModelForImageTextToText`, offline, eval mode."""
    model = AutoModelForImageTextToText.from_pretrained(
        Path(folder), local_files_only=True, attn_implementation=attn_implementation
    )
    return model.eval()


def load_snapshot(folder: str | Path, *, attn_implementation: str = "sdpa"):
    """`(model, processor)` of a snapshot folder, offline."""
    return load_model(folder, attn_implementation=attn_implementation), load_processor(folder)
