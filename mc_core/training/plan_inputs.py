"""What the cost plan (``mc_core.training.plan``) needs of an architecture, found offline.

- The config: a saved base model's folder (``models/base/<arch>``: a tiny teacher's
  ``config.json``, or a real model's ``resolved.json`` located in this machine's hub cache); else
  for a built-in real model (``mc_core.models.zoo.REAL``) its family's benchmark shape (the
  published dimensions ``bench/shapes.py`` uses) or, for the real models without one, the
  published ``config.json`` values below; else a tiny architecture built from its spec. Nothing is
  downloaded.
- The sequence shapes: measured when the arch's processor is at hand (a saved folder or a tiny
  architecture) and prepared data exists: a seeded sample of its dialogues is encoded as the
  target cache encodes them (``encode_dialogue``), giving text tokens (answers included), answer
  tokens and visual tokens per image (the longest of each). Otherwise ``Assumptions``, stated
  in the plan: the visual tokens still come from the family's processor (built offline with the
  real model's image settings) on an image of the assumed size, so they are exact for it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mc_core.models import families, zoo

__all__ = ["Assumptions", "ArchInput", "arch_input", "real_config"]

_PROMPT_WORDS = ["what", "is", "it", "red"]  # the offline tokenizer's words (counts only)


@dataclass(frozen=True)
class Assumptions:
    """Dialogue shapes assumed where none are measured (real models: no tokenizer offline).

    Defaults: a three-turn MT-GQA dialogue. Per turn 36 prompt tokens: a GQA question averages
    ~10 words (~13 tokens), the chat template's role markers ~8 and the short-answer instruction
    ("Answer the question using a single word or phrase.") ~12; 4 answer tokens: a word or two
    as the frozen model says it (``train.targets: teacher``) and the end-of-turn token. A
    35-token system prompt (Vicuna's, as LLaVA's template writes it). One image per dialogue of
    640 x 480 pixels, the most common GQA / COCO size.
    """

    turns: int = 3
    system_tokens: int = 35
    prompt_tokens_per_turn: int = 36
    answer_tokens_per_turn: int = 4
    image_size: tuple[int, int] = (640, 480)  # width, height
    images_per_dialogue: int = 1

    def __post_init__(self) -> None:
        for name in ("turns", "prompt_tokens_per_turn", "answer_tokens_per_turn"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Assumptions.{name}={v!r}: expected an int >= 1")

    @property
    def text_tokens(self) -> int:
        per_turn = self.prompt_tokens_per_turn + self.answer_tokens_per_turn
        return self.system_tokens + self.turns * per_turn

    @property
    def answer_tokens(self) -> int:
        return self.turns * self.answer_tokens_per_turn

    def describe(self) -> str:
        w, h = self.image_size
        return (
            f"assumed: {self.turns} turns x ({self.prompt_tokens_per_turn} prompt + "
            f"{self.answer_tokens_per_turn} answer tokens) + {self.system_tokens} system, "
            f"{self.images_per_dialogue} image(s) of {w}x{h} per dialogue"
        )


@dataclass(frozen=True)
class ArchInput:
    """An architecture's config and dialogue shapes (the longest of the data, or assumed).

    Attributes:
        arch: its name in the grid.
        config: its transformers config (the meta model and the FLOPs are built from it).
        visual_tokens: visual tokens of an image, n (the most of any image).
        text_tokens: text tokens of a dialogue, answers included (the most).
        answer_tokens: answer tokens of a dialogue (the most).
        images_per_dialogue: images of a dialogue (the most).
        source: where the shapes come from, for the plan's notes.
    """

    arch: str
    config: Any = field(repr=False)
    visual_tokens: int
    text_tokens: int
    answer_tokens: int
    images_per_dialogue: int
    source: str


def real_config(name: str):
    """The config of a built-in real model (``zoo.REAL``), built offline from its published
    dimensions. ValueError naming the known names for another."""
    if name not in zoo.REAL:
        raise ValueError(f"arch={name!r} is not a built-in real model; known: {sorted(zoo.REAL)}")
    fam = families.get(zoo.REAL[name].family, where=f"zoo.REAL[{name!r}].family")
    if name in fam.bench:
        shape = fam.bench[name]
        return fam.bench_config(shape, shape.text, shape.vision)
    published = zoo.REAL[name].config  # the family file's copy of its config.json
    if not published:
        raise ValueError(f"arch={name!r}: no offline config (no benchmark shape, not published)")
    return fam.model_class.config_class(**published)


def _offline_processor(fam, name: str):
    """The family's processor with the real model's image settings and a word-level tokenizer:
    exact visual-token counts, not text counts."""
    from mc_core.models.processors import build_processor

    return build_processor(fam.name, list(_PROMPT_WORDS), **zoo.REAL[name].processor_kwargs)


def _encode(processor, fam, images, questions, answers) -> tuple[int, list[int], int]:
    """(text tokens, visual tokens per image, answer tokens) of one encoded dialogue."""
    from mc_core.inference.dialogue import encode_dialogue

    inputs, positions = encode_dialogue(processor, images, questions, answers)
    ids = inputs["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids(fam.specials["image"])
    is_image = (ids == image_id).tolist()
    runs = [0]  # each image's placeholders are one run of image tokens
    for prev, cur in zip([False, *is_image], is_image, strict=False):
        if cur:
            runs[-1] += 1
        elif prev:
            runs.append(0)
    runs = [r for r in runs if r]
    visual = sum(runs)
    if len(runs) != len(images):  # runs that touch: split evenly
        runs = [visual // len(images)] * len(images)
    return len(is_image) - visual, runs, len(positions)


def _measured(arch, config, fam, processor, data_dir: Path, sample: int, seed: int) -> ArchInput:
    from mc_core.data import schema
    from mc_core.data.images import as_rgb

    ds = schema.load(data_dir)
    rows = random.Random(seed).sample(range(len(ds)), min(sample, len(ds)))
    text = answers = images = n = 0
    for i in rows:
        row = schema.row(ds, i)
        ims = row["image"] if isinstance(row["image"], list | tuple) else [row["image"]]
        t, vis, a = _encode(processor, fam, as_rgb(list(ims)), row["questions"], row["answers"])
        text, answers = max(text, t), max(answers, a)
        images, n = max(images, len(vis)), max(n, *vis)
    source = f"{data_dir}: {len(rows)} of {len(ds)} dialogues encoded (seed {seed})"
    return ArchInput(arch, config, n, text, answers, images, source)


def _assumed(arch, config, fam, processor, assume: Assumptions) -> ArchInput:
    from PIL import Image

    image = Image.new("RGB", assume.image_size, (128, 128, 128))
    q, a = ["what is it"], ["red"]
    _, visual, _ = _encode(processor, fam, [image] * assume.images_per_dialogue, q, a)
    return ArchInput(
        arch,
        config,
        max(visual),
        assume.text_tokens,
        assume.answer_tokens,
        assume.images_per_dialogue,
        assume.describe(),
    )


def _from_folder(folder: Path, arch: str):
    """(config, processor, family) of a saved base model folder, offline; None when absent."""
    from mc_core.models.processors import load_processor

    info = folder / "zoo.json"
    if not info.is_file():
        return None
    fam = families.get(json.loads(info.read_text()).get("family"), where=f"{info} family")
    if (folder / "resolved.json").is_file():
        if arch in zoo.REAL:  # its published shape: no need to find the weights
            return None
        import transformers

        from mc_core.models import hub

        record = json.loads((folder / "resolved.json").read_text())
        located = hub.locate(record, where=str(folder / "resolved.json"))
        processor = transformers.AutoProcessor.from_pretrained(located, local_files_only=True)
        return fam.model_class.config_class.from_pretrained(located), processor, fam
    return fam.model_class.config_class.from_pretrained(folder), load_processor(folder), fam


def arch_input(
    arch: str,
    *,
    base_dir: str | Path = "models/base",
    data_dir: str | Path | None = "data/train",
    sample: int = 64,
    seed: int = 0,
    assume: Assumptions = Assumptions(),
) -> ArchInput:
    """The config and shapes of ``arch`` (module docstring says from where).

    Raises:
        ValueError: an arch with no offline config (names it and how to get one).
    """
    found = _from_folder(Path(base_dir) / arch, arch)
    if found is not None:
        config, processor, fam = found
    elif arch in zoo.REAL:
        config = real_config(arch)
        fam = families.for_config(config)
        processor = _offline_processor(fam, arch)
        return _assumed(arch, config, fam, processor, assume)  # no real tokenizer offline
    elif arch in zoo.TINY:
        model, processor = zoo.build(arch)  # tiny: the shapes of the trained one
        config, fam = model.config, families.for_model(model)
    else:
        raise ValueError(
            f"arch={arch!r}: no config offline: not in {Path(base_dir) / arch}, not a built-in "
            f"real model ({sorted(zoo.REAL)}) nor a tiny one ({sorted(zoo.TINY)}); run its "
            f"base stage first (dvc repro base@{arch})"
        )
    if data_dir is not None and Path(data_dir).is_dir():
        return _measured(arch, config, fam, processor, Path(data_dir), sample, seed)
    return _assumed(arch, config, fam, processor, assume)
