"""Which part of the image each visual token sees, and the labels the recipe derives from it.

The token layout of an image comes from the family descriptor
(``mc_core.models.families.for_model(model).token_grids``): one row-major grid per part of the
visual
sequence (a LLaVA-NeXT base view, its crops with a newline token per row...). The generator's
ground truth (``synthetic.patch_labels``) is projected onto that layout: per token, the covering
object, its colour and shape, its region and whether it holds an object's centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mc_core.data import synthetic as S

__all__ = [
    "LABEL_KEYS",
    "Example",
    "Grid",
    "Layout",
    "label_sizes",
    "layout_for",
    "look_target",
    "make_pool",
    "render_example",
    "selector_index",
    "slot_targets",
    "slot_words",
    "token_labels",
]

LABEL_KEYS = ("colour", "shape", "row", "col", "centre")


@dataclass(frozen=True)
class Grid:
    """A row-major grid of token footprints over the whole image."""

    h: int
    w: int
    newline: bool = False  # one extra (non-visual) token after each row

    @property
    def n(self) -> int:
        return self.h * (self.w + int(self.newline))


@dataclass(frozen=True)
class Layout:
    """The visual token sequence of one image: its grids in order."""

    grids: tuple[Grid, ...]

    @property
    def n(self) -> int:
        return sum(g.n for g in self.grids)


def layout_for(model, world: S.WorldConfig, processor) -> Layout:
    """Layout of the world's square images for ``model``, from its family descriptor (and
    ``processor``, where it resizes images: Qwen2-VL's min / max pixels)."""
    from mc_core.models import families

    parts = families.for_model(model).token_grids(model.config, world.image_size, processor)
    return Layout(tuple(Grid(int(h), int(w), bool(nl)) for h, w, nl in parts))


def label_sizes(world: S.WorldConfig) -> dict[str, int]:
    """Classes per label (colour and shape include 'background')."""
    return {
        "colour": len(world.colours) + 1,
        "shape": len(world.shapes) + 1,
        "row": world.grid,
        "col": world.grid,
        "centre": 2,
    }


def token_labels(
    ids: np.ndarray, scene: S.Scene, world: S.WorldConfig, layout: Layout
) -> dict[str, np.ndarray]:
    """Per visual token labels (int64 ``[n]``; -100 on newline tokens), ``object`` ids and the
    index of the token's ``grid`` in the layout. A centre label always sits on a token its
    object covers."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*LABEL_KEYS, "object", "grid")}
    for gi, g in enumerate(layout.grids):
        lab = S.patch_labels(ids, scene, world, (g.h, g.w))
        lab["grid"] = np.full(g.h * g.w, gi, dtype=np.int64)
        for k in parts:
            v = lab[k].reshape(g.h, g.w)
            if g.newline:
                v = np.concatenate([v, np.full((g.h, 1), -100, dtype=np.int64)], axis=1)
            parts[k].append(v.reshape(-1))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["centre"][(out["centre"] == 1) & (out["object"] < 0)] = 0
    return out


@dataclass
class Example:
    """A rendered scene with its per-token labels."""

    scene: S.Scene
    image: object  # PIL image
    labels: dict[str, np.ndarray]


def render_example(seed: int, index: int, world: S.WorldConfig, layout: Layout) -> Example:
    """Scene ``index`` of the world under ``seed``, rendered and labelled."""
    scene = S.make_scene(S.scene_rng(seed, index, 0), world)
    image, ids = S.render(scene, world)
    return Example(scene, image, token_labels(ids, scene, world, layout))


def make_pool(
    seed: int, count: int, world: S.WorldConfig, layout: Layout, start: int = 0
) -> list[Example]:
    """Scenes ``start .. start + count - 1`` under ``seed``."""
    return [render_example(seed, start + i, world, layout) for i in range(count)]


def _target(target: str) -> tuple[str, list[str]]:
    kind, _, value = target.partition(":")
    return kind, value.split(",")


def slot_words(question: str, qtype: str) -> tuple[int, int, int]:
    """Indices (in the question's words) of the slot words read by layer-0 heads 0, 1, 2."""
    w = question.split()
    if qtype in ("colour", "shape"):
        return w.index("row") + 1, w.index("column") + 1, 1
    if qtype == "count":
        return 2, 1, 1
    return 3, 4, 1  # "is there a <colour> <shape> ?"


def slot_targets(target: str, qtype: str, world: S.WorldConfig) -> tuple[int, int, int]:
    """(question type, slot a, slot b) classes the layer-0 read-out must decode."""
    t = S.QUESTION_TYPES.index(qtype)
    kind, v = _target(target)
    if kind == "region":
        return t, int(v[0]), int(v[1])
    if kind == "colour":
        return t, world.colours.index(v[0]), 0
    return t, world.colours.index(v[0]), world.shapes.index(v[1])


def look_target(ex: Example, target: str) -> list[int]:
    """Visual-token indices (-1 = the sequence's first token, a 'none' sink) the last LLM
    layer's pointer head should read for a question about ``target``."""
    lab = ex.labels
    # Centres on the finest grid only (LLaVA-NeXT: the high-resolution crop, not the base view).
    centres = np.flatnonzero((lab["centre"] == 1) & (lab["grid"] == lab["grid"].max()))
    objs = ex.scene.objects
    kind, v = _target(target)
    if kind == "region":
        r, c = int(v[0]), int(v[1])
        keep = [
            int(i)
            for i in centres
            if (objs[lab["object"][i]].row, objs[lab["object"][i]].col) == (r, c)
        ]
        if not keep:  # centre token missed: read the object's covered tokens
            keep = [
                int(i)
                for i in np.flatnonzero(lab["object"] >= 0)
                if (objs[lab["object"][i]].row, objs[lab["object"][i]].col) == (r, c)
            ]
        return keep
    if kind == "colour":
        return [-1] + [int(i) for i in centres if objs[lab["object"][i]].colour == v[0]]
    return [-1] + [
        int(i)
        for i in centres
        if objs[lab["object"][i]].colour == v[0] and objs[lab["object"][i]].shape == v[1]
    ]


def selector_index(labels: dict[str, np.ndarray], m: int) -> np.ndarray:
    """The ground-truth selector: object-centre tokens (every grid), filled up to ``m`` with
    equidistant other tokens (or thinned equidistantly when there are more than ``m``);
    sorted token indices ``[m]``."""
    n = len(labels["centre"])
    centres = np.flatnonzero(labels["centre"] == 1)
    if len(centres) >= m:
        return centres[np.round(np.linspace(0, len(centres) - 1, m)).astype(np.int64)]
    rest = np.setdiff1d(np.arange(n), centres)
    fill = rest[np.round(np.linspace(0, len(rest) - 1, m - len(centres))).astype(np.int64)]
    return np.sort(np.concatenate([centres, fill[: m - len(centres)]]))
