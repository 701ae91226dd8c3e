"""The synthetic world's scenes: its parameters, its objects, and how a scene is drawn.

A scene is a pure function of its RNG (``scene_rng(seed, index)``): which regions of the
``grid x grid`` array hold an object, each object's colour, shape, size and position inside its
region, and the recipe of the textured background. ``mc_core.data.synthetic`` (the world's
public face, which re-exports these names) asks questions about scenes;
``mc_core.data.synthetic_render`` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = [
    "COUNT_WORDS",
    "QUESTION_TYPES",
    "RGB",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "make_scene",
    "scene_rng",
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
RGB = {  # every colour the world knows: name -> base RGB (objects jitter around it)
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
            if c not in RGB:
                bad("colours", f"unknown colour {c!r}; known: {sorted(RGB)}")
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
        base = np.array(RGB[colour])
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
