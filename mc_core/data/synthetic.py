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
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COUNT_WORDS",
    "QUESTION_TYPES",
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

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "exist")
COUNT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
)
_RGB = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (45, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (145, 50, 185),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 200, 215),
    "pink": (240, 130, 190),
}
_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
_SUPERSAMPLE = 2  # render at 2x and box-filter down: anti-aliased edges, deterministic bytes


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the world (every field has a default; all are plain values for params.yaml).

    Attributes:
        image_size: side of the square image in pixels.
        grid: regions per side (``grid * grid`` regions).
        occupancy: probability that a region holds an object.
        min_objects: at least this many objects per image (so three distinct targets exist).
        size_range: object side in pixels, uniform in [lo, hi] (1-1.5 tokens of 14 px).
        colours: colour names (a subset of the known palette).
        shapes: shape names (a subset of circle, square, triangle, cross, diamond).
        type_weights: relative frequency of colour, shape, count, exist questions.
        colour_jitter: per-channel uniform jitter of an object's colour.
    """

    image_size: int = 224
    grid: int = 4
    occupancy: float = 0.5
    min_objects: int = 3
    size_range: tuple[float, float] = (14.0, 21.0)
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    type_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.2)
    colour_jitter: int = 12

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"WorldConfig.{name}={getattr(self, name)!r}: {msg}")

        if not isinstance(self.image_size, int) or self.image_size < 16:
            bad("image_size", "expected an int >= 16")
        if not isinstance(self.grid, int) or not 1 <= self.grid <= 9:
            bad("grid", "expected an int in [1, 9] (rows/columns are single words 1..9)")
        if not 0.0 < self.occupancy <= 1.0:
            bad("occupancy", "expected 0 < occupancy <= 1")
        if not 3 <= self.min_objects <= self.grid * self.grid:
            bad("min_objects", f"expected 3 <= min_objects <= grid^2 = {self.grid**2}")
        lo, hi = self.size_range
        region = self.image_size / self.grid
        if not 2 <= lo <= hi <= region - 2:
            bad("size_range", f"expected 2 <= lo <= hi <= region side - 2 = {region - 2:g}")
        for c in self.colours:
            if c not in _RGB:
                bad("colours", f"unknown colour {c!r}; known: {sorted(_RGB)}")
        for s in self.shapes:
            if s not in _SHAPES:
                bad("shapes", f"unknown shape {s!r}; known: {list(_SHAPES)}")
        if len(set(self.colours)) != len(self.colours) or len(self.colours) < 2:
            bad("colours", "expected at least 2 distinct colours")
        if len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            bad("shapes", "expected at least 2 distinct shapes")
        w = self.type_weights
        if len(w) != len(QUESTION_TYPES) or any(x < 0 for x in w) or sum(w) <= 0:
            bad("type_weights", f"expected {len(QUESTION_TYPES)} non-negative weights, sum > 0")
        if self.grid * self.grid >= len(COUNT_WORDS):
            bad("grid", f"counts up to grid^2 need words; at most {len(COUNT_WORDS) - 1} objects")

    @classmethod
    def from_dict(cls, d: dict | None, *, where: str = "world") -> WorldConfig:
        """Builds a config from a plain mapping (a params.yaml section); unknown keys raise."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; expected a subset of {sorted(names)}"
            )
        for key in ("size_range", "colours", "shapes", "type_weights"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain, YAML/JSON-friendly mapping (tuples become lists)."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in fields(self)
        }

    @property
    def region_px(self) -> float:
        return self.image_size / self.grid


@dataclass(frozen=True)
class SceneObject:
    """One object: region (row, col), attributes, and geometry in image pixels."""

    row: int
    col: int
    colour: str
    shape: str
    size: float  # side of the bounding square, px
    cy: float  # centre, px
    cx: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A full scene: its objects and the background recipe (all drawn from one RNG)."""

    objects: tuple[SceneObject, ...]
    background: dict = field(default_factory=dict)

    def at(self, row: int, col: int) -> SceneObject | None:
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None


@dataclass(frozen=True)
class Dialogue:
    """Three turns about one scene."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    question_types: tuple[str, ...]
    targets: tuple[str, ...]


def scene_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The RNG of scene ``index`` under ``seed`` (``stream`` separates scenes from dialogues)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed}, index={index}: expected non-negative integers")
    return np.random.default_rng([int(seed), int(index), int(stream)])


def make_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Draws a scene: occupied regions, object attributes and positions, background."""
    g = cfg.grid
    occupied = np.flatnonzero(rng.random(g * g) < cfg.occupancy)
    if len(occupied) < cfg.min_objects:
        occupied = np.sort(rng.choice(g * g, size=cfg.min_objects, replace=False))
    region = cfg.region_px
    objects = []
    for r_idx in occupied:
        row, col = divmod(int(r_idx), g)
        colour = cfg.colours[int(rng.integers(len(cfg.colours)))]
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        size = float(rng.uniform(*cfg.size_range))
        # Anywhere inside the region with a 1 px margin: the object never crosses its region.
        half = size / 2 + 1
        cy = row * region + float(rng.uniform(half, region - half))
        cx = col * region + float(rng.uniform(half, region - half))
        base = np.array(_RGB[colour])
        rgb = np.clip(base + rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3), 0, 255)
        objects.append(
            SceneObject(row, col, colour, shape, size, cy, cx, tuple(int(v) for v in rgb))
        )
    background = {
        "grey": float(rng.uniform(95, 165)),
        "tint": [float(v) for v in rng.uniform(-10, 10, 3)],
        "kind": ["stripes", "checker", "blobs"][int(rng.integers(3))],
        "angle": float(rng.uniform(0, math.pi)),
        "period": float(rng.uniform(10, 40)),
        "amplitude": float(rng.uniform(6, 18)),
        "noise_seed": int(rng.integers(2**31)),
    }
    return Scene(tuple(objects), background)


def _background(scene: Scene, side: int) -> np.ndarray:
    """Textured, low-saturation background [side, side, 3] float (pixels of the output size)."""
    b = scene.background
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    if b["kind"] == "stripes":
        t = np.sin(
            2 * math.pi * (xx * math.cos(b["angle"]) + yy * math.sin(b["angle"])) / b["period"]
        )
    elif b["kind"] == "checker":
        p = b["period"]
        t = (((xx // p) + (yy // p)) % 2) * 2.0 - 1.0
    else:
        rng = np.random.default_rng(b["noise_seed"] + 1)
        t = np.zeros((side, side))
        for _ in range(6):
            cy, cx = rng.uniform(0, side, 2)
            rad = rng.uniform(side / 10, side / 4)
            t += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rad**2)) * rng.choice([-1, 1])
        t = np.clip(t, -1, 1)
    noise = np.random.default_rng(b["noise_seed"]).normal(0.0, 5.0, (side, side, 1))
    img = b["grey"] + b["amplitude"] * t[..., None] + np.array(b["tint"]) + noise
    return img


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cy: float, cx: float, size: float, fill
) -> None:
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        s = h * 0.9  # same visual weight as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif shape == "cross":
        t = h * 0.38
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
    else:  # pragma: no cover - WorldConfig validates shapes
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, cfg: WorldConfig) -> tuple[Image.Image, np.ndarray]:
    """Draws the scene.

    Returns:
        ``(image, ids)``: the RGB image (``image_size`` square) and an int16 map of shape
        ``[2 * image_size, 2 * image_size]`` (supersampled) giving, per sub-pixel, the index of
        the object drawn there in ``scene.objects`` or -1 for background.
    """
    side = cfg.image_size
    big = side * _SUPERSAMPLE
    ids_img = Image.new("I", (big, big), -1)
    ids_draw = ImageDraw.Draw(ids_img)
    fg = Image.new("RGB", (big, big), (0, 0, 0))
    fg_draw = ImageDraw.Draw(fg)
    s = _SUPERSAMPLE
    for k, o in enumerate(scene.objects):
        _draw_shape(ids_draw, o.shape, o.cy * s, o.cx * s, o.size * s, k)
        _draw_shape(fg_draw, o.shape, o.cy * s, o.cx * s, o.size * s, o.rgb)
    ids = np.asarray(ids_img, dtype=np.int32).astype(np.int16)
    mask = (ids >= 0).astype(np.float64)
    # Box-filter the supersampled foreground and coverage down to the output size.
    cover = mask.reshape(side, s, side, s).mean(axis=(1, 3))[..., None]
    fg_np = np.asarray(fg, dtype=np.float64).reshape(side, s, side, s, 3).sum(axis=(1, 3))
    fg_mean = fg_np / np.maximum(cover[..., 0:1] * s * s, 1e-9)
    img = _background(scene, side) * (1 - cover) + fg_mean * cover
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return out, ids


def blank_image(cfg: WorldConfig, grey: int = 128) -> Image.Image:
    """A uniform grey image of the world's size (the 'does the teacher look?' control)."""
    return Image.new("RGB", (cfg.image_size, cfg.image_size), (grey, grey, grey))


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


def patch_labels(
    ids: np.ndarray,
    scene: Scene,
    cfg: WorldConfig,
    grid: tuple[int, int],
    window: tuple[float, float, float, float] | None = None,
    min_cover: float = 0.25,
) -> dict[str, np.ndarray]:
    """Per-token ground truth for a ``grid = (h, w)`` of token footprints over ``window``.

    Args:
        ids: the supersampled object-id map from :func:`render`.
        scene: the scene drawn.
        cfg: its world.
        grid: ``(h, w)`` tokens, row-major, tiling ``window`` evenly.
        window: ``(y0, x0, y1, x1)`` in image pixels the grid covers (default: the whole image;
            a crop of a multi-crop model covers a part).
        min_cover: a token belongs to the object covering the largest fraction of its
            footprint if that fraction is at least this, else to the background.

    Returns:
        int64 arrays of shape ``[h * w]``: ``object`` (index into ``scene.objects`` or -1),
        ``colour`` (index into ``cfg.colours``, ``len(colours)`` = background), ``shape``
        (index into ``cfg.shapes``, ``len(shapes)`` = background), ``centre`` (1 on the token
        holding the largest part of an object: one per object in the window), ``row`` /
        ``col`` (region of the footprint's centre), ``cover`` (float, the fraction covered by
        ``object``).
    """
    h, w = grid
    side = cfg.image_size
    y0, x0, y1, x1 = window if window is not None else (0.0, 0.0, float(side), float(side))
    if h < 1 or w < 1 or not (0 <= y0 < y1 <= side and 0 <= x0 < x1 <= side):
        raise ValueError(f"patch_labels: grid={grid}, window={window} outside a {side}px image")
    s = ids.shape[0] / side
    ys = np.linspace(y0, y1, h + 1)
    xs = np.linspace(x0, x1, w + 1)
    n_obj = len(scene.objects)
    out = {
        k: np.zeros(h * w, dtype=np.int64)
        for k in ("object", "colour", "shape", "centre", "row", "col")
    }
    cover = np.zeros(h * w, dtype=np.float64)
    col_idx = {c: i for i, c in enumerate(cfg.colours)}
    shp_idx = {c: i for i, c in enumerate(cfg.shapes)}
    counts = np.zeros((h * w, n_obj), dtype=np.int64)  # sub-pixels of each object per token
    for i in range(h):
        a, b = int(round(ys[i] * s)), max(int(round(ys[i + 1] * s)), int(round(ys[i] * s)) + 1)
        for j in range(w):
            c, d = int(round(xs[j] * s)), max(int(round(xs[j + 1] * s)), int(round(xs[j] * s)) + 1)
            k = i * w + j
            block = ids[a:b, c:d].ravel()
            if n_obj:
                counts[k] = np.bincount(block.astype(np.int64) + 1, minlength=n_obj + 1)[1:]
            area = block.size
            cy, cx = (ys[i] + ys[i + 1]) / 2, (xs[j] + xs[j + 1]) / 2
            out["row"][k] = min(int(cy // cfg.region_px), cfg.grid - 1)
            out["col"][k] = min(int(cx // cfg.region_px), cfg.grid - 1)
            best = int(counts[k].argmax()) if n_obj else -1
            frac = counts[k, best] / area if n_obj else 0.0
            out["object"][k] = best if n_obj and frac >= min_cover else -1
            cover[k] = frac if out["object"][k] >= 0 else 0.0
    # Each object's centre token: the one holding most of it (exactly one per object in the
    # window); it belongs to that object even when the object covers < min_cover of it.
    for o in range(n_obj):
        if counts[:, o].max() > 0:
            k = int(counts[:, o].argmax())
            out["centre"][k] = 1
            out["object"][k] = o
    for k in range(h * w):
        obj = out["object"][k]
        out["colour"][k] = col_idx[scene.objects[obj].colour] if obj >= 0 else len(cfg.colours)
        out["shape"][k] = shp_idx[scene.objects[obj].shape] if obj >= 0 else len(cfg.shapes)
    out["cover"] = cover
    return out
