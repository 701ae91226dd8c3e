"""Training tiny base LVLMs into real teachers on the synthetic world (they must look).

Plain from-scratch training stalls at chance on CPU (``../shared/notes/teacher-training.md``):
at init the answer attends almost uniformly over n visual tokens and an object covers 1-2% of
them. So the learning problem is changed, not the hyper-parameters:

Stage 1 (vision): the tower and projector are trained alone with dense per-token labels from the
    generator (``synthetic.patch_labels``): the first channels of each visual token (LLM space)
    are read as logits of the covering object's colour and shape, the token's region row and
    column, and whether it holds an object's centre. The LLM thus receives tokens whose content
    is linearly readable (the note's "projector initialised from the per-patch head").
Stage 2 (language): tower and projector frozen (their outputs are computed once per image and
    fed through ``mm_encoder_outputs``); the LLM learns to answer three-turn dialogues (all
    answers and end-of-turn tokens supervised, teacher forcing) with training-only aids:
    (a) three heads of LLM layer 0 supervised to attend to the current question's slot words
    (row / colour word, column / shape word, question-type word); (b) a linear read-out of
    those slots at the answer position after layer 0; (c) head 0 of the last LLM layer
    supervised to attend to the centre token of the asked region's object, head 1 to the first
    token (a "none" sink) plus the centres of matching objects for count / existence; (d) for
    rotary-only towers (Qwen2-VL), a read-out of each visual token's region after layer 0, so
    the LLM learns where a token is from its mrope position. The aids are discarded: the saved
    teacher is a plain transformers model.

The evaluation answers each held-out turn after the previous gold turns (teacher forcing) through
the real processor and pixel path; the blank-image control and the 10% equidistant sampling
control go through the same model (sampling via ``mm_encoder_outputs`` with m placeholders).
Training is resumable: a checkpoint (weights, aids, optimiser, clock) is written every
``checkpoint_every`` steps and at each stage end.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mc_core import zoo
from mc_core.data import synthetic as S
from mc_core.processing import special_tokens

__all__ = ["TeacherConfig", "Layout", "evaluate", "layout_for", "token_labels", "train_teacher"]


@dataclass
class TeacherConfig:
    """Knobs of the recipe (defaults: tuned for ~10 CPU minutes per tiny architecture)."""

    seed: int = 0
    train_images: int = 1500
    eval_dialogues: int = 300
    curve_dialogues: int = 96
    eval_seed: int = 10_000  # held-out world seed (training uses `seed`)
    stage1_seconds: float = 180.0
    stage1_max_steps: int = 3000
    stage1_batch: int = 16
    stage1_lr: float = 3e-3
    stage2_seconds: float = 780.0
    stage2_max_steps: int = 3000
    stage2_batch: int = 24
    stage2_lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    attn_weight: float = 1.0
    slot_weight: float = 0.5
    colour_first_steps: int = 0
    # Question mix of the training dialogues (colour, shape, count, exist): colour is learned
    # first and fastest, counting last, so training leans on count / exist. Evaluation uses the
    # world's own mix.
    train_type_weights: tuple[float, float, float, float] = (0.2, 0.25, 0.3, 0.25)
    curve_every_seconds: float = 45.0
    checkpoint_every: int = 50
    target_acc: float = 0.97  # stage 2 stops early once the curve reaches this
    # A saved base model whose tensors of the same name and shape initialise this one (e.g.
    # tiny-llava for tiny-llava-next: same tower, projector and LLM shapes, as LLaVA-NeXT
    # starts from LLaVA-1.5's recipe). None: random init.
    init_from: str | None = None
    # Per-architecture changes of the knobs above. LLaVA-NeXT's 528-token sequences make a
    # step twice as slow (smaller batches, more steps); Qwen's 64-token steps are fast enough
    # that the time budget, not the step cap, should end stage 2.
    arch_overrides: dict[str, dict] = field(
        default_factory=lambda: {"tiny-llava-next": {"stage2_batch": 16,
                                                     "init_from": "models/base/tiny-llava",
                                                     "stage1_seconds": 45.0},
                                 "tiny-qwen2-vl": {"stage2_max_steps": 8000}})
    threads: int = 1  # 2 threads run ~6x slower than 1 when the other core is busy (measured)

    @classmethod
    def from_dict(cls, d: dict | None, *, where: str = "base") -> TeacherConfig:
        """From a params.yaml section; unknown keys raise a ValueError naming them."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; expected a subset of {sorted(names)}")
        if "train_type_weights" in d:
            d["train_type_weights"] = tuple(d["train_type_weights"])
        cfg = cls(**d)
        for arch, over in cfg.arch_overrides.items():
            bad = sorted(set(over) - (names - {"arch_overrides"}))
            if bad:
                raise ValueError(f"{where}.arch_overrides.{arch}: unknown keys {bad}")
        return cfg

    def for_arch(self, arch: str) -> TeacherConfig:
        """This config with ``arch_overrides[arch]`` applied."""
        over = dict(self.arch_overrides.get(arch, {}))
        if "train_type_weights" in over:
            over["train_type_weights"] = tuple(over["train_type_weights"])
        return replace(self, **over)


# ---------------------------------------------------------------------------------------------
# Token layout: which part of the image each visual token sees.


@dataclass(frozen=True)
class Grid:
    """A row-major grid of token footprints tiling a window of the image."""

    h: int
    w: int
    newline: bool = False  # one extra (non-visual) token after each row (LLaVA-NeXT)

    @property
    def n(self) -> int:
        return self.h * (self.w + int(self.newline))


@dataclass(frozen=True)
class Layout:
    """The visual token sequence of one image: grids in order (all over the whole image)."""

    grids: tuple[Grid, ...]

    @property
    def n(self) -> int:
        return sum(g.n for g in self.grids)


def layout_for(model, world: S.WorldConfig) -> Layout:
    """Layout of the world's (square) images for a tiny model's family."""
    family = zoo._family_of(model)
    side = world.image_size
    if family == "llava":
        vc = model.config.vision_config
        g = vc.image_size // vc.patch_size
        return Layout((Grid(g, g),))
    if family == "llava_next":
        vc = model.config.vision_config
        crop = vc.image_size
        per = crop // vc.patch_size
        if side % crop:
            raise ValueError(f"world image_size={side} is not a multiple of the crop side {crop}")
        k = side // crop  # square image -> the k x k pinpoint (must be among the pinpoints)
        if [side, side] not in [list(p) for p in model.config.image_grid_pinpoints]:
            raise ValueError(f"world image_size={side}: [{side}, {side}] is not a grid pinpoint")
        return Layout((Grid(per, per), Grid(per * k, per * k, newline=True)))
    vc = model.config.vision_config
    step = vc.patch_size * vc.spatial_merge_size
    if side % step:
        raise ValueError(f"world image_size={side} is not a multiple of patch*merge={step}")
    return Layout((Grid(side // step, side // step),))


_LABEL_KEYS = ("colour", "shape", "row", "col", "centre")


def _label_sizes(world: S.WorldConfig) -> dict[str, int]:
    return {"colour": len(world.colours) + 1, "shape": len(world.shapes) + 1,
            "row": world.grid, "col": world.grid, "centre": 2}


def token_labels(ids: np.ndarray, scene: S.Scene, world: S.WorldConfig,
                 layout: Layout) -> dict[str, np.ndarray]:
    """Per visual token labels (int64 ``[n]``; -100 on newline tokens), ``object`` ids and the
    index of the token's ``grid`` in the layout."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*_LABEL_KEYS, "object", "grid")}
    for gi, g in enumerate(layout.grids):
        lab = S.patch_labels(ids, scene, world, (g.h, g.w))
        lab["grid"] = np.full(g.h * g.w, gi, dtype=np.int64)
        for k in parts:
            v = lab[k].reshape(g.h, g.w)
            if g.newline:
                v = np.concatenate([v, np.full((g.h, 1), -100, dtype=np.int64)], axis=1)
            parts[k].append(v.reshape(-1))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Data: a pool of rendered scenes with labels.


@dataclass
class Example:
    scene: S.Scene
    image: object  # PIL image
    labels: dict[str, np.ndarray]


def make_pool(seed: int, count: int, world: S.WorldConfig, layout: Layout) -> list[Example]:
    out = []
    for i in range(count):
        scene = S.make_scene(S.scene_rng(seed, i, 0), world)
        image, ids = S.render(scene, world)
        out.append(Example(scene, image, token_labels(ids, scene, world, layout)))
    return out


def _pixel_inputs(processor, images: list) -> dict[str, torch.Tensor]:
    """The image part of the processor's output (pixel_values, image_sizes / image_grid_thw)."""
    out = processor.image_processor(images=images, return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}


def image_features(model, processor, images: list) -> list[torch.Tensor]:
    """Projector outputs per image, ``[n_i, d]`` each (differentiable)."""
    kw = _pixel_inputs(processor, images)
    return list(model.model.get_image_features(**kw, return_dict=True).pooler_output)


# ---------------------------------------------------------------------------------------------
# Dialogue encoding with slot positions.


def _messages(questions, answers, upto: int, *, image: bool = True) -> list[dict]:
    msgs = []
    for k in range(upto):
        content = [{"type": "text", "text": questions[k]}]
        if k == 0 and image:
            content = [{"type": "image"}, *content]
        msgs.append({"role": "user", "content": content})
        if k < upto - 1:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answers[k]}]})
    return msgs


def _full_messages(questions, answers) -> list[dict]:
    """All turns, the last answer included."""
    msgs = _messages(questions, answers, len(questions))
    msgs.append({"role": "assistant", "content": [{"type": "text", "text": answers[-1]}]})
    return msgs


def _slot_words(question: str, qtype: str) -> tuple[int, int, int]:
    """Indices (in the question's words) of the slot words read by layer-0 heads 0, 1, 2."""
    w = question.split()
    if qtype in ("colour", "shape"):
        return w.index("row") + 1, w.index("column") + 1, 1
    if qtype == "count":
        return 2, 1, 1
    return 3, 4, 1  # "is there a <colour> <shape> ?"


@dataclass
class Encoded:
    """One dialogue as token ids with the positions the losses read."""

    input_ids: list[int]
    image_start: int  # index of the first visual placeholder
    answer_pos: list[int]  # positions whose next-token prediction is the answer word
    answer_ids: list[int]
    eos_id: int
    slots: list[tuple[int, int, int]]  # absolute positions of the 3 slot words per turn


def encode(processor, questions, answers, qtypes, n_visual: int, *, image_token: str,
           end_token: str) -> Encoded:
    """Tokenises a full dialogue (all turns) with ``n_visual`` placeholders (word-level)."""
    tok = processor.tokenizer
    text = processor.apply_chat_template(_full_messages(questions, answers), tokenize=False)
    ids = tok(text.replace(image_token, image_token * n_visual), add_special_tokens=False)[
        "input_ids"]
    img_id = tok.convert_tokens_to_ids(image_token)
    image_start = ids.index(img_id)
    answer_pos, answer_ids, slots = [], [], []
    for k in range(len(questions)):
        prefix = processor.apply_chat_template(_messages(questions, answers, k + 1),
                                               add_generation_prompt=True, tokenize=False)
        p_ids = tok(prefix.replace(image_token, image_token * n_visual),
                    add_special_tokens=False)["input_ids"]
        if ids[: len(p_ids)] != p_ids:
            raise ValueError(f"chat template is not prefix-stable at turn {k + 1}: {prefix!r}")
        a_id = tok.convert_tokens_to_ids(answers[k])
        if ids[len(p_ids)] != a_id:
            raise ValueError(f"answer {answers[k]!r} is not one token in the vocabulary")
        answer_pos.append(len(p_ids) - 1)
        answer_ids.append(a_id)
        q_ids = tok(questions[k], add_special_tokens=False)["input_ids"]
        # The question is the last occurrence of its words before the generation prompt.
        start = max(i for i in range(len(p_ids) - len(q_ids) + 1)
                    if p_ids[i: i + len(q_ids)] == q_ids)
        slots.append(tuple(start + j for j in _slot_words(questions[k], qtypes[k])))
    return Encoded(ids, image_start, answer_pos, answer_ids, tok.convert_tokens_to_ids(end_token),
                   slots)


# ---------------------------------------------------------------------------------------------
# Aids (training only) and targets.


class Aids(nn.Module):
    """Training-only read-outs: stage-1 label slices and stage-2 slot probes."""

    def __init__(self, d_text: int, world: S.WorldConfig):
        super().__init__()
        self.sizes = _label_sizes(world)
        self.slot_sizes = {"type": len(S.QUESTION_TYPES), "a": max(world.grid, len(world.colours)),
                           "b": max(world.grid, len(world.shapes))}
        self.slots = nn.Linear(d_text, sum(self.slot_sizes.values()))
        # Region row / column of each visual token read after LLM layer 0 (rotary towers).
        self.pos = nn.Linear(d_text, 2 * world.grid)

    def split_labels(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first channels of visual tokens read as label logits ``{key: [n, k]}``."""
        out, i = {}, 0
        for k in _LABEL_KEYS:
            out[k] = feats[..., i: i + self.sizes[k]]
            i += self.sizes[k]
        return out


def _slot_targets(question: str, qtype: str, world: S.WorldConfig) -> tuple[int, int, int]:
    w = question.split()
    t = S.QUESTION_TYPES.index(qtype)
    if qtype in ("colour", "shape"):
        return t, int(w[w.index("row") + 1]) - 1, int(w[w.index("column") + 1]) - 1
    if qtype == "count":
        return t, world.colours.index(w[2]), 0
    return t, world.colours.index(w[3]), world.shapes.index(w[4])


def _look_target(ex: Example, question: str, qtype: str, world: S.WorldConfig) -> list[int]:
    """Visual-token indices (relative to the image start; -1 = first token) head 0 should read."""
    lab = ex.labels
    # Centres on the finest grid only (LLaVA-NeXT: the high-resolution crops, not the base view).
    centres = np.flatnonzero((lab["centre"] == 1) & (lab["grid"] == lab["grid"].max()))
    objs = ex.scene.objects
    w = question.split()
    if qtype in ("colour", "shape"):
        r, c = int(w[w.index("row") + 1]) - 1, int(w[w.index("column") + 1]) - 1
        keep = [int(i) for i in centres if objs[lab["object"][i]].row == r
                and objs[lab["object"][i]].col == c] if len(objs) else []
        if not keep:  # centre token missed (object under min_cover): read its covered tokens
            keep = [int(i) for i in np.flatnonzero(lab["object"] >= 0)
                    if objs[lab["object"][i]].row == r and objs[lab["object"][i]].col == c]
        return keep
    if qtype == "count":
        colour = w[2]
        return [-1] + [int(i) for i in centres if lab["object"][i] >= 0
                       and objs[lab["object"][i]].colour == colour]
    colour, shape = w[3], w[4]
    return [-1] + [int(i) for i in centres if lab["object"][i] >= 0
                   and objs[lab["object"][i]].colour == colour
                   and objs[lab["object"][i]].shape == shape]


def _centre_labels(ex: Example) -> None:
    """Makes ``centre`` labels point at tokens actually covered by their object (idempotent)."""
    lab = ex.labels
    bad = (lab["centre"] == 1) & (lab["object"] < 0)
    lab["centre"][bad] = 0


# ---------------------------------------------------------------------------------------------
# Batching for stage 2 (features precomputed, fed through mm_encoder_outputs).


@dataclass
class Batch:
    inputs: dict
    ans_pos: torch.Tensor  # [A, 2] (row, position) predicting answers
    ans_ids: torch.Tensor  # [A]
    eos_pos: torch.Tensor  # [A, 2]
    eos_ids: torch.Tensor  # [A]
    look: list[tuple[int, int, list[int]]]  # (row, query position, key positions) for head 0
    slot_pos: list[tuple[int, int, tuple[int, int, int]]]
    slot_targets: torch.Tensor  # [A, 3]
    qtypes: list[str]
    slot_index: torch.Tensor | None = None  # [4, 3A] (row, head, query, key) for layer 0
    look_index: torch.Tensor | None = None  # [4, K] (row, head, query, key), last layer
    look_weight: torch.Tensor | None = None  # [K] 1 / |target set|
    vis_rowcol: torch.Tensor | None = None  # [2, B * n] region row / column per visual token


def collate(model, encs: list[Encoded], feats: list[torch.Tensor], looks: list[list[list[int]]],
            slot_t: list[list[tuple[int, int, int]]], qtypes: list[list[str]], *,
            pad_id: int, family: str) -> Batch:
    """Right-padded batch; ``mm_encoder_outputs`` carries the given visual tokens."""
    T = max(len(e.input_ids) for e in encs)
    B = len(encs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    ans_pos, ans_ids, eos_pos, eos_ids, look, slot_pos, st, qt = [], [], [], [], [], [], [], []
    for b, e in enumerate(encs):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[b, : len(e.input_ids)] = 1
        for k, p in enumerate(e.answer_pos):
            ans_pos.append((b, p))
            ans_ids.append(e.answer_ids[k])
            eos_pos.append((b, p + 1))
            eos_ids.append(e.eos_id)
            keys = [0 if j < 0 else e.image_start + j for j in looks[b][k]]
            look.append((b, p, keys))
            slot_pos.append((b, p, e.slots[k]))
            st.append(slot_t[b][k])
            qt.append(qtypes[b][k])
    inputs = {"input_ids": ids, "attention_mask": mask,
              "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
    if family == "qwen2_vl":
        inputs.update(_qwen_grid(model, ids, feats))
    si = [(bi, h, p, pos) for bi, p, sl in slot_pos for h, pos in enumerate(sl)]
    li, lw = [], []
    for (bi, p, keys), qtype in zip(look, qt, strict=True):
        # Head 0 looks up a region, head 1 gathers matches (count / exist): one W_q W_k each,
        # so the two kinds of lookup do not fight over the same projection.
        head = 0 if qtype in ("colour", "shape") else 1
        for key in keys:
            li.append((bi, head, p, key))
            lw.append(1.0 / len(keys))
    return Batch(inputs, torch.tensor(ans_pos), torch.tensor(ans_ids), torch.tensor(eos_pos),
                 torch.tensor(eos_ids), look, slot_pos, torch.tensor(st), qt,
                 torch.tensor(si).T, torch.tensor(li).T, torch.tensor(lw))


def _qwen_grid(model, ids: torch.Tensor, feats: list[torch.Tensor]) -> dict:
    """image_grid_thw / mm_token_type_ids for full (square-grid) Qwen visual tokens."""
    merge = model.config.vision_config.spatial_merge_size
    grids = []
    for f in feats:
        side = int(round(math.sqrt(f.shape[0])))
        if side * side != f.shape[0]:
            raise ValueError(f"Qwen features of {f.shape[0]} tokens are not a square grid")
        grids.append([1, side * merge, side * merge])
    tt = (ids == model.config.image_token_id).to(torch.int)
    return {"image_grid_thw": torch.tensor(grids), "mm_token_type_ids": tt}


# ---------------------------------------------------------------------------------------------
# Checkpointing.


def _save_ckpt(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch's zip writer rejects some names (a leading dot): a plain temporary name.
    fd, tmp = tempfile.mkstemp(prefix="ckpt-tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Training.


class _Clock:
    """Wall-clock training seconds that survive a resume."""

    def __init__(self, start: float = 0.0):
        self.base, self.t0 = start, time.monotonic()

    def __call__(self) -> float:
        return self.base + time.monotonic() - self.t0


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _horizon(step: int, max_steps: int, elapsed: float, budget: float) -> int:
    """Steps the cosine schedule spans: the step cap or the pace-projected time budget."""
    if elapsed <= 0 or step == 0:
        return max_steps
    return max(step + 1, min(max_steps, int(step * budget / elapsed)))


def _dialogue(ex_index: int, ex: Example, seed: int, step_salt: int, world: S.WorldConfig,
              type_weights: tuple[float, ...] | None = None) -> S.Dialogue:
    rng = S.scene_rng(seed, ex_index, 2 + step_salt)
    if type_weights is not None:
        world = S.WorldConfig(**{**world.__dict__, "type_weights": tuple(type_weights)})
    return S.make_dialogue(ex.scene, rng, world)


def train_teacher(arch: str, out_dir: str | os.PathLike, cfg: TeacherConfig | None = None, *,
                  world: S.WorldConfig | None = None, spec: zoo.TinySpec | None = None,
                  callbacks: list[Callable[[dict], None]] | None = None,
                  progress: bool = True) -> dict:
    """Trains a tiny architecture into a teacher, saves it to ``out_dir``, returns its report.

    Args:
        arch: a name in ``zoo.TINY``.
        out_dir: where the plain transformers model + processor are saved (``zoo.save``);
            ``out_dir/../.<name>-ckpt.pt`` holds the resumable checkpoint while training.
        cfg: the recipe's knobs.
        world: the synthetic world (default ``WorldConfig()``).
        spec: override the architecture's sizes (tests).
        callbacks: called with event dicts (``{"event": "step"|"curve"|"stage", ...}``).
        progress: show tqdm bars.

    Returns:
        The report dict (see :func:`evaluate`) plus ``train_seconds``, ``curve`` (list of
        ``[seconds, acc]``), ``stage1_seconds`` and ``steps``.
    """
    from tqdm.auto import tqdm

    cfg = (cfg or TeacherConfig()).for_arch(spec.name if spec else arch)
    world = world or S.WorldConfig()
    callbacks = callbacks or []
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    ckpt_path = out_dir.parent / f"{out_dir.name}-ckpt.pt"

    def emit(event: dict) -> None:
        for cb in callbacks:
            cb(event)

    model, processor = zoo.build(spec or arch, seed=cfg.seed, attn_implementation="eager")
    family = zoo._family_of(model)
    layout = layout_for(model, world)
    aids = Aids(model.config.text_config.hidden_size, world)
    sp = special_tokens(family)
    pad_id = processor.tokenizer.pad_token_id

    if not state_exists(ckpt_path):
        _init_positions(model)
        if cfg.init_from:
            _init_from(model, cfg.init_from)
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    if state is not None and state.get("arch") != (spec.name if spec else arch):
        state = None
    clock = _Clock(state["seconds"] if state else 0.0)
    curve: list[list[float]] = state["curve"] if state else []
    if state:
        model.load_state_dict(state["model"])
        aids.load_state_dict(state["aids"])

    pool = make_pool(cfg.seed, cfg.train_images, world, layout)
    for ex in pool:
        _centre_labels(ex)
    heldout = make_pool(cfg.eval_seed, cfg.curve_dialogues, world, layout)
    for ex in heldout:
        _centre_labels(ex)
    n_vis = layout.n

    # ---- stage 1: tower + projector with dense labels --------------------------------------
    vision_params = [p for n, p in model.named_parameters()
                     if not n.startswith(("model.language_model", "lm_head"))]
    # Rotary-only towers (Qwen2-VL) cannot know absolute positions: no row/col labels there.
    rotary = not hasattr(getattr(model.model, "vision_tower", None), "embeddings")
    label_weights = {k: 1.0 for k in _LABEL_KEYS}
    if rotary:
        label_weights.update(row=0.0, col=0.0)
    stage = state["stage"] if state else 1
    step = state["step"] if state else 0
    if stage == 1:
        opt = torch.optim.AdamW(vision_params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay,
                                betas=(0.9, 0.98))
        if state and "opt" in state:
            opt.load_state_dict(state["opt"])
        model.train()
        rng = np.random.default_rng([cfg.seed, 1, step])
        bar = tqdm(total=cfg.stage1_max_steps, initial=step, desc=f"{arch} stage1 (vision)",
                   disable=not progress)
        stage1_t0 = clock()
        budget_end = (state.get("stage1_end") if state else None) or stage1_t0 + cfg.stage1_seconds
        while step < cfg.stage1_max_steps and clock() < budget_end:
            idx = rng.choice(len(pool), cfg.stage1_batch, replace=False)
            feats = torch.cat(image_features(model, processor, [pool[i].image for i in idx]))
            logits = aids.split_labels(feats)
            loss, accs = 0.0, {}
            centre = torch.from_numpy(np.concatenate([pool[i].labels["centre"] for i in idx]))
            for k in _LABEL_KEYS:
                if not label_weights[k]:
                    continue
                y = torch.from_numpy(np.concatenate([pool[i].labels[k] for i in idx]))
                if k == "shape":
                    # Shape is read at each object's centre token only (what the LLM attends
                    # to); elsewhere it is ill-posed (a token sees a sliver of the object).
                    y = torch.where(centre == 1, y, torch.full_like(y, -100))
                weight = torch.tensor([1.0, 8.0]) if k == "centre" else None  # ~3% positives
                loss = loss + label_weights[k] * F.cross_entropy(
                    logits[k], y, weight=weight, ignore_index=-100)
                ok = y != -100
                if k == "centre":
                    ok = y == 1  # recall on the rare positives is what matters
                accs[k] = (logits[k].argmax(-1)[ok] == y[ok]).float().mean().item()
            for g in opt.param_groups:
                g["lr"] = cfg.stage1_lr * _lr_factor(step, 20, cfg.stage1_max_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vision_params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in accs.items()})
            emit({"event": "step", "stage": 1, "step": step, "loss": loss.item(), **accs,
                  "seconds": clock()})
            if step % cfg.checkpoint_every == 0:
                _save_ckpt(ckpt_path, {"arch": spec.name if spec else arch, "stage": 1,
                                       "step": step, "seconds": clock(), "curve": curve,
                                       "model": model.state_dict(), "aids": aids.state_dict(),
                                       "opt": opt.state_dict(), "stage1_end": budget_end})
        bar.close()
        stage, step = 2, 0
        _save_ckpt(ckpt_path, {"arch": spec.name if spec else arch, "stage": 2, "step": 0,
                               "seconds": clock(), "curve": curve, "model": model.state_dict(),
                               "aids": aids.state_dict()})
        emit({"event": "stage", "stage": 1, "seconds": clock()})
        state = None
    stage1_seconds = clock() if not state else state.get("stage1_seconds", 0.0)

    # ---- stage 2: LLM on frozen visual tokens ------------------------------------------------
    model.eval()
    for p in vision_params:
        p.requires_grad_(False)
    with torch.no_grad():
        feats_pool = []
        for i in tqdm(range(0, len(pool), 64), desc=f"{arch} visual tokens", disable=not progress):
            feats_pool += [f.detach() for f in image_features(
                model, processor, [e.image for e in pool[i: i + 64]])]
        feats_held = []
        for i in range(0, len(heldout), 64):
            feats_held += [f.detach() for f in image_features(
                model, processor, [e.image for e in heldout[i: i + 64]])]
    if feats_pool[0].shape[0] != n_vis:
        raise ValueError(f"{arch}: {feats_pool[0].shape[0]} visual tokens, layout says {n_vis}")

    lm_params = [p for n, p in model.named_parameters()
                 if n.startswith(("model.language_model", "lm_head"))]
    train_params = lm_params + list(aids.slots.parameters()) + list(aids.pos.parameters())
    opt = torch.optim.AdamW(train_params, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    if state and "opt" in state:
        opt.load_state_dict(state["opt"])
    n_layers = model.config.text_config.num_hidden_layers
    enc_kw = {"image_token": sp["image"], "end_token": sp["end_of_turn"]}

    def make_batch(indices, examples, feats, salt, type_weights=None, seed=cfg.seed):
        encs, fs, looks, slots, qts = [], [], [], [], []
        for i in indices:
            d = _dialogue(int(i), examples[i], seed, salt, world, type_weights)
            encs.append(encode(processor, d.questions, d.answers, d.question_types, n_vis,
                               **enc_kw))
            fs.append(feats[i])
            looks.append([_look_target(examples[i], q, t, world)
                          for q, t in zip(d.questions, d.question_types, strict=True)])
            slots.append([_slot_targets(q, t, world)
                          for q, t in zip(d.questions, d.question_types, strict=True)])
            qts.append(list(d.question_types))
        batch = collate(model, encs, fs, looks, slots, qts, pad_id=pad_id, family=family)
        batch.vis_rowcol = torch.from_numpy(np.stack([
            np.concatenate([examples[i].labels[k] for i in indices]) for k in ("row", "col")]))
        return batch

    curve_batches = [make_batch(range(i, min(i + 32, len(heldout))), heldout, feats_held, 0,
                                seed=cfg.eval_seed)
                     for i in range(0, len(heldout), 32)]

    def curve_acc() -> float:
        hits = total = 0
        with torch.no_grad():
            for b in curve_batches:
                _reset(model)
                logits = model(**b.inputs).logits
                pred = logits[b.ans_pos[:, 0], b.ans_pos[:, 1]].argmax(-1)
                hits += (pred == b.ans_ids).sum().item()
                total += len(b.ans_ids)
        return hits / total

    bar = tqdm(total=cfg.stage2_max_steps, initial=step, desc=f"{arch} stage2 (LLM)",
               disable=not progress)
    rng = np.random.default_rng([cfg.seed, 2, step])
    stage2_t0 = clock()
    budget_end = (state.get("stage2_end") if state else None) or stage2_t0 + cfg.stage2_seconds
    last_curve = -1e9
    acc = curve[-1][1] if curve else 0.0
    while step < cfg.stage2_max_steps and clock() < budget_end:
        if clock() - last_curve >= cfg.curve_every_seconds:
            model.eval()
            acc = curve_acc()
            curve.append([round(clock(), 1), round(acc, 4)])
            emit({"event": "curve", "seconds": clock(), "acc": acc, "step": step})
            last_curve = clock()
            if acc >= cfg.target_acc:
                break
        model.train()
        idx = rng.choice(len(pool), cfg.stage2_batch, replace=False)
        weights = ((1.0, 0.0, 0.0, 0.0) if step < cfg.colour_first_steps
                   else cfg.train_type_weights)
        b = make_batch(idx, pool, feats_pool, step + 1, type_weights=weights)
        _reset(model)
        out = model(**b.inputs, output_attentions=True, output_hidden_states=True)
        logits = out.logits
        ans_loss = F.cross_entropy(logits[b.ans_pos[:, 0], b.ans_pos[:, 1]], b.ans_ids)
        eos_loss = F.cross_entropy(logits[b.eos_pos[:, 0], b.eos_pos[:, 1]], b.eos_ids)
        # Attention supervision: cross-entropy of each supervised head against its target set.
        att0, attL = out.attentions[0], out.attentions[n_layers - 1]  # (B, H, T, T)
        # One gather per layer: per-entry indexing would build a full-size gradient each time.
        i0 = b.slot_index  # (4, A*3): batch, head, query, key
        att_loss = -torch.log(att0[i0[0], i0[1], i0[2], i0[3]] + 1e-6).sum()
        iL, wL = b.look_index, b.look_weight  # (4, K), (K,)
        att_loss = att_loss - (torch.log(attL[iL[0], iL[1], iL[2], iL[3]] + 1e-6) * wL).sum()
        att_loss = att_loss / len(b.look)
        h1 = out.hidden_states[1][b.ans_pos[:, 0], b.ans_pos[:, 1]]  # (A, d) after layer 0
        slot_logits = aids.slots(h1).split(list(aids.slot_sizes.values()), dim=-1)
        slot_loss = sum(F.cross_entropy(sl, b.slot_targets[:, j])
                        for j, sl in enumerate(slot_logits))
        loss = ans_loss + eos_loss + cfg.attn_weight * att_loss + cfg.slot_weight * slot_loss
        if rotary:
            # The tower has no absolute positions: layer 0 must derive each token's region from
            # mrope for the last layer's lookup; this read-out teaches it to.
            vis = b.inputs["input_ids"] == model.config.image_token_id  # (B, T)
            pos_logits = aids.pos(out.hidden_states[1][vis]).split(world.grid, dim=-1)
            pos_loss = sum(F.cross_entropy(pl, b.vis_rowcol[j], ignore_index=-100)
                           for j, pl in enumerate(pos_logits))
            loss = loss + cfg.slot_weight * pos_loss
        for g in opt.param_groups:
            g["lr"] = cfg.stage2_lr * _lr_factor(step, cfg.warmup_steps, _horizon(
                step, cfg.stage2_max_steps, clock() - stage2_t0, budget_end - stage2_t0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{ans_loss.item():.3f}", att=f"{att_loss.item():.2f}",
                        slot=f"{slot_loss.item():.2f}", acc=f"{acc:.2f}")
        emit({"event": "step", "stage": 2, "step": step, "loss": ans_loss.item(),
              "att_loss": att_loss.item(), "slot_loss": slot_loss.item(), "seconds": clock()})
        if step % cfg.checkpoint_every == 0:
            _save_ckpt(ckpt_path, {"arch": spec.name if spec else arch, "stage": 2,
                                   "step": step, "seconds": clock(), "curve": curve,
                                   "model": model.state_dict(), "aids": aids.state_dict(),
                                   "opt": opt.state_dict(), "stage2_end": budget_end,
                                   "stage1_seconds": stage1_seconds})
    bar.close()
    model.eval()
    if not curve or curve[-1][0] < clock() - 1:
        acc = curve_acc()
        curve.append([round(clock(), 1), round(acc, 4)])
    train_seconds = clock()
    for p in model.parameters():
        p.requires_grad_(True)
    report = evaluate(model, processor, world, n_dialogues=cfg.eval_dialogues,
                      seed=cfg.eval_seed, progress=progress)
    report.update(arch=spec.name if spec else arch, train_seconds=round(train_seconds, 1),
                  stage1_seconds=round(stage1_seconds, 1), steps=step, curve=curve,
                  recipe=asdict(cfg), world=world.to_dict())
    zoo.save(model, processor, out_dir, meta={"arch": spec.name if spec else arch,
                                              "world": world.to_dict(),
                                              "acc_avg": report["acc_avg"]})
    if ckpt_path.exists():
        ckpt_path.unlink()
    emit({"event": "done", **{k: v for k, v in report.items() if k != "curve"}})
    return report


def state_exists(path: Path) -> bool:
    return path.exists()


def _init_from(model, path: str) -> list[str]:
    """Copies the tensors of a saved base model with the same name and shape into ``model``.

    Raises:
        ValueError: ``path`` is not a saved base model, or nothing matches (wrong family).
    """
    if not (Path(path) / "zoo.json").is_file():
        raise ValueError(f"base.init_from={path!r}: no saved base model there (train it first)")
    source, _ = zoo.load(path)
    mine = model.state_dict()
    taken = {k: v for k, v in source.state_dict().items()
             if k in mine and mine[k].shape == v.shape}
    if not taken:
        raise ValueError(f"init_from={path!r}: no tensor matches {type(model).__name__}")
    model.load_state_dict(taken, strict=False)
    return sorted(taken)


def _sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos table ``[h * w, dim]`` (half the channels for rows, half for columns)."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * freq[None]
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def _init_positions(model) -> None:
    """CLIP towers: a 2-D sin-cos position table (random tables slow stage 1 down a lot)."""
    tower = getattr(model.model, "vision_tower", None)
    emb = getattr(tower, "embeddings", None)
    if emb is None or not hasattr(emb, "position_embedding"):
        return  # Qwen towers use 2-D rotary positions
    table = emb.position_embedding.weight  # (1 + g*g, d): CLS first
    g = int(round(math.sqrt(table.shape[0] - 1)))
    with torch.no_grad():
        table[1:] = _sincos_2d(g, g, table.shape[1]) * 0.5
        table[0] = 0.0


def _reset(model) -> None:
    # Qwen keeps mrope deltas between calls; an unrelated forward must not reuse them.
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None


# ---------------------------------------------------------------------------------------------
# Evaluation through the real processor.


def _sampled_inputs(model, processor, inputs: dict, rate: float) -> dict:
    """Inputs feeding ``ceil((1 - rate) * n)`` equidistant visual tokens (m placeholders)."""
    kw = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    with torch.no_grad():
        feats = model.model.get_image_features(**kw, return_dict=True).pooler_output[0]
    n = feats.shape[0]
    m = max(1, math.ceil((1 - rate) * n - 1e-9))
    index = torch.round(torch.linspace(0, n - 1, m)).long()
    ids = inputs["input_ids"][0]
    img = model.config.image_token_id
    pos = (ids == img).nonzero()[:, 0]
    new_ids = torch.cat([ids[: pos[0]], ids[pos[:m]], ids[pos[-1] + 1:]])[None]
    out = {"input_ids": new_ids, "attention_mask": torch.ones_like(new_ids),
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(
               pooler_output=[feats[index]])}}
    if "image_grid_thw" in inputs:
        # Qwen: every kept token keeps its own 3-D (mrope) position from the full sequence.
        full_pos, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])  # (3, 1, T)
        keep = torch.cat([torch.arange(int(pos[0])), pos[index],
                          torch.arange(int(pos[-1]) + 1, ids.shape[0])])
        out["position_ids"] = full_pos[:, :, keep]
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, keep]
    return out


def evaluate(model, processor, world: S.WorldConfig, *, n_dialogues: int = 300,
             seed: int = 10_000, rate: float = 0.9, progress: bool = False) -> dict:
    """Held-out accuracies of a base model on the synthetic world.

    Each turn is answered after the previous gold turns (teacher forcing, one forward over the
    whole dialogue); the answer is the argmax token at the answer position.

    Returns:
        ``acc_turn`` (3), ``acc_avg``, ``acc_blank_image``, ``chance`` (majority answer per
        question type), ``acc_sample_r0.9`` (equidistant sampling keeping 10%), ``acc_by_type``,
        ``n_dialogues``, ``visual_tokens``.
    """
    from tqdm.auto import tqdm

    family = zoo._family_of(model)
    sp = special_tokens(family)
    tok = processor.tokenizer
    turns = 3
    hits = {"full": np.zeros(turns), "blank": np.zeros(turns), "sample": np.zeros(turns)}
    by_type: dict[str, list[int]] = {}
    answers_by_type: dict[str, list[str]] = {}
    blank = S.blank_image(world)
    n_visual = None
    model.eval()
    for i in tqdm(range(n_dialogues), desc="evaluate", disable=not progress):
        _, image, d = S.example(seed, i, world)
        text = processor.apply_chat_template(_full_messages(d.questions, d.answers),
                                             tokenize=False)
        # Answer positions from the prefix property of the template.
        pos = []
        for k in range(turns):
            prefix = processor.apply_chat_template(_messages(d.questions, d.answers, k + 1),
                                                   add_generation_prompt=True, tokenize=False)
            pos.append(prefix)
        gold = [tok.convert_tokens_to_ids(a) for a in d.answers]
        pre_len = None
        for cond, img in (("full", image), ("blank", blank), ("sample", image)):
            inputs = processor(images=[img], text=[text], return_tensors="pt")
            n_img = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
            n_visual = n_visual or n_img
            if pre_len is None:
                pre_len = [len(tok(p.replace(sp["image"], sp["image"] * n_img),
                                   add_special_tokens=False)["input_ids"]) for p in pos]
            shift = 0
            if cond == "sample":
                inputs = _sampled_inputs(model, processor, inputs, rate)
                shift = n_img - int((inputs["input_ids"][0] == model.config.image_token_id).sum())
            _reset(model)
            with torch.no_grad():
                logits = model(**inputs).logits[0]
            for k in range(turns):
                ok = int(logits[pre_len[k] - 1 - shift].argmax()) == gold[k]
                hits[cond][k] += ok
                if cond == "full":
                    by_type.setdefault(d.question_types[k], []).append(ok)
        for k in range(turns):
            answers_by_type.setdefault(d.question_types[k], []).append(d.answers[k])
    acc = {c: (h / n_dialogues) for c, h in hits.items()}
    return {
        "acc_turn": [round(float(a), 4) for a in acc["full"]],
        "acc_avg": round(float(acc["full"].mean()), 4),
        "acc_blank_image": round(float(acc["blank"].mean()), 4),
        "chance": round(S.chance_accuracy(answers_by_type), 4),
        f"acc_sample_r{rate:g}": round(float(acc["sample"].mean()), 4),
        "acc_by_type": {t: round(float(np.mean(v)), 4) for t, v in sorted(by_type.items())},
        "n_dialogues": n_dialogues,
        "visual_tokens": n_visual,
    }


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Writes the report JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp files are private; a report is for everyone
    os.replace(tmp, path)
    return path

