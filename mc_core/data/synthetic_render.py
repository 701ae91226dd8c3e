"""Drawing the synthetic world: a scene's pixels and the per-token ground truth under them.

``render`` draws a scene (``mc_core.data.synthetic_scene``) supersampled and box-filtered down,
so edges are anti-aliased and the bytes are deterministic; it also returns the supersampled map
of which object covers each sub-pixel, from which ``patch_labels`` derives what covers each
token footprint (the dense supervision of a teacher). ``mc_core.data.synthetic`` re-exports
these names.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from mc_core.data.synthetic_scene import Scene, WorldConfig

__all__ = ["blank_image", "patch_labels", "render"]

_SUPERSAMPLE = 2  # render at 2x and box-filter down: anti-aliased edges, deterministic bytes


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
