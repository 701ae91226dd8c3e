"""The synthetic multi-turn VQA world: small objects in a grid of regions, three-turn dialogues.

An image is a ``grid x grid`` array of square regions over a textured grey background; each
region holds at most one object (a shape in a colour, of a size) placed at a random position
inside it. Objects are small on purpose: about 1-1.5 visual-token footprints wide (14-21 px at
224 px for 16 x 16 tokens), so that keeping 10% of the tokens by equidistant sampling loses most
objects and compression matters.

Questions (one-word answers):
    colour at a region  "what colour is at row 2 column 3 ?"  -> "red"
    shape at a region   "what shape is at row 2 column 3 ?"   -> "circle"
    count of a colour   "how many red objects are there ?"    -> "two"
    existence of a pair "is there a red circle ?"             -> "yes" / "no"
Rows and columns are 1-based in the text; targets use 0-based ``region:r,c``, ``colour:red`` and
``pair:red,circle``. The three turns of a dialogue have distinct targets, so location questions
ask about three different regions: the tokens turn 1 needs are not the ones turns 2-3 need.

Everything is a pure function of ``(seed, index)``: dialogue ``i`` of ``generate(n, seed)`` is the
same for every ``n``, and its PNG bytes are identical across runs. ``patch_labels`` gives the
per-token ground truth a teacher is densely supervised with (what covers each token footprint).

Modules: ``synthetic_scene`` (the world's parameters and scenes), ``synthetic_render`` (pixels
and per-token labels) and this one (dialogues about a scene, the dataset, the vocabulary), which
re-exports the others' public names: ``mc_core.data.synthetic`` is the world's one entry point.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mc_core.data.synthetic_render import blank_image, patch_labels, render
from mc_core.data.synthetic_scene import (
    COUNT_WORDS,
    QUESTION_TYPES,
    RGB,
    Scene,
    SceneObject,
    WorldConfig,
    make_scene,
    scene_rng,
)

__all__ = [
    "COUNT_WORDS",
    "QUESTION_TYPES",
    "RGB",
    "Dialogue",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "blank_image",
    "chance_accuracy",
    "generate",
    "make_dialogue",
    "make_scene",
    "patch_labels",
    "render",
    "scene_rng",
    "vocabulary",
]


@dataclass(frozen=True)
class Dialogue:
    """Three turns about one scene."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    question_types: tuple[str, ...]
    targets: tuple[str, ...]


def _loc_text(row: int, col: int) -> str:
    return f"row {row + 1} column {col + 1}"


def _question(
    qtype: str, scene: Scene, rng: np.random.Generator, cfg: WorldConfig, used: set[str]
) -> tuple[str, str, str] | None:
    """One (question, answer, target) of ``qtype`` whose target is not in ``used``, or None."""
    if qtype in ("colour", "shape"):
        free = [o for o in scene.objects if f"region:{o.row},{o.col}" not in used]
        if not free:
            return None
        o = free[int(rng.integers(len(free)))]
        q = f"what {qtype} is at {_loc_text(o.row, o.col)} ?"
        return q, (o.colour if qtype == "colour" else o.shape), f"region:{o.row},{o.col}"
    if qtype == "count":
        free = [c for c in cfg.colours if f"colour:{c}" not in used]
        if not free:
            return None
        c = free[int(rng.integers(len(free)))]
        n = sum(o.colour == c for o in scene.objects)
        return f"how many {c} objects are there ?", COUNT_WORDS[n], f"colour:{c}"
    # exist: half the time a pair that is present, else one that is absent (balanced yes/no).
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    absent = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in present]
    want_yes = bool(rng.random() < 0.5)
    pool = [
        p
        for p in (present if want_yes or not absent else absent)
        if f"pair:{p[0]},{p[1]}" not in used
    ]
    if not pool:
        return None
    c, s = pool[int(rng.integers(len(pool)))]
    answer = "yes" if (c, s) in present else "no"
    return f"is there a {c} {s} ?", answer, f"pair:{c},{s}"


def make_dialogue(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, turns: int = 3
) -> Dialogue:
    """Draws ``turns`` questions about ``scene`` with pairwise distinct targets."""
    weights = np.asarray(cfg.type_weights, dtype=np.float64)
    weights = weights / weights.sum()
    used: set[str] = set()
    qs, ans, types, targets = [], [], [], []
    for _ in range(turns):
        for _attempt in range(64):
            qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=weights))]
            got = _question(qtype, scene, rng, cfg, used)
            if got is not None:
                break
        else:  # pragma: no cover - min_objects >= 3 guarantees three free regions
            raise ValueError(
                f"could not draw {turns} distinct turns for a scene "
                f"with {len(scene.objects)} objects"
            )
        q, a, t = got
        used.add(t)
        qs.append(q)
        ans.append(a)
        types.append(qtype)
        targets.append(t)
    return Dialogue(tuple(qs), tuple(ans), tuple(types), tuple(targets))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def example(seed: int, index: int, cfg: WorldConfig) -> tuple[Scene, Image.Image, Dialogue]:
    """Scene, image and dialogue number ``index`` of the world under ``seed``."""
    scene = make_scene(scene_rng(seed, index, 0), cfg)
    image, _ = render(scene, cfg)
    dialogue = make_dialogue(scene, scene_rng(seed, index, 1), cfg)
    return scene, image, dialogue


def generate(n_dialogues: int, seed: int, cfg: WorldConfig | None = None):
    """Generates ``n_dialogues`` synthetic dialogues as a ``datasets.Dataset`` of the schema.

    Args:
        n_dialogues: number of dialogues (one image each).
        seed: world seed; dialogue ``i`` depends only on ``(seed, i, cfg)``.
        cfg: the world (default ``WorldConfig()``).

    Returns:
        A dataset with the columns of ``mc_core.data.schema.FEATURES`` (image as PNG bytes)
        and the optional ``object_centres`` (each object's centre (row, col) in [0, 1]).
    """
    import datasets

    from mc_core.data.schema import FEATURES, OPTIONAL_FEATURES  # the package stays light

    cfg = cfg or WorldConfig()
    if isinstance(n_dialogues, bool) or not isinstance(n_dialogues, int) or n_dialogues < 1:
        raise ValueError(f"n_dialogues={n_dialogues!r}: expected a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative int")
    features = datasets.Features({**FEATURES, **OPTIONAL_FEATURES})
    rows: dict[str, list] = {k: [] for k in features}
    for i in range(n_dialogues):
        scene, image, d = example(seed, i, cfg)
        ident = f"synthetic-s{seed}-{i:06d}"
        rows["dialogue_id"].append(ident)
        rows["source"].append("synthetic")
        rows["image_id"].append(ident)
        rows["image"].append({"bytes": _png(image), "path": None})
        rows["questions"].append(list(d.questions))
        rows["answers"].append(list(d.answers))
        rows["answer_sets"].append([[a] for a in d.answers])
        rows["question_types"].append(list(d.question_types))
        rows["targets"].append(list(d.targets))
        # Ground truth for the selector ceiling (mc_core.evaluation.ceilings): object centres on
        # the image.
        side = float(cfg.image_size)
        rows["object_centres"].append([[o.cy / side, o.cx / side] for o in scene.objects])
    return datasets.Dataset.from_dict(rows, features=features)


def vocabulary(cfg: WorldConfig | None = None) -> list[str]:
    """Every word the world's questions and answers use, in a fixed order (tokenizer vocab)."""
    cfg = cfg or WorldConfig()
    words = [
        "what",
        "colour",
        "shape",
        "is",
        "at",
        "row",
        "column",
        "?",
        "how",
        "many",
        "objects",
        "are",
        "there",
        "a",
        "yes",
        "no",
    ]
    words += [str(i + 1) for i in range(cfg.grid)]
    words += list(cfg.colours) + list(cfg.shapes)
    words += list(COUNT_WORDS[: cfg.grid * cfg.grid + 1])
    return list(dict.fromkeys(words))


def chance_accuracy(answers_by_type: dict[str, Sequence[str]]) -> float:
    """Majority-answer accuracy per question type, averaged as the questions are.

    Args:
        answers_by_type: for each question type, the gold answers of its questions.

    Returns:
        ``sum_t count(majority answer of t) / total``: a model that knows only the question
        type (the best blind guess) scores this.
    """
    total = sum(len(v) for v in answers_by_type.values())
    if total == 0:
        raise ValueError("chance_accuracy: no answers given")
    hits = 0
    for answers in answers_by_type.values():
        if answers:
            _, counts = np.unique(np.asarray(list(answers)), return_counts=True)
            hits += int(counts.max())
    return hits / total
