"""Dialogue images: the one conversion to RGB and the sizes the processors take.

Every image a model sees should pass through :func:`to_rgb`, and every image a builder writes
through :func:`rgb_bytes` (the MT-GQA / MT-VQA-v2 builders and ``source: dataset`` do), so a
grey, palette, CMYK or transparent image looks the same to training, evaluation and serving.

Conversion (:func:`to_rgb`):

- ``RGB``: returned as it is (the same object).
- with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` with a transparent colour):
  composited on white (:data:`BACKGROUND`). A plain ``convert("RGB")`` drops alpha and shows
  whatever colour the transparent pixels happen to store, often black.
- 16/32-bit integer grey (``I;16``, ``I;16B``, ``I;16L``, ``I``: what PIL decodes 16-bit PNG and
  TIFF to): scaled from 0..65535 to 0..255. PIL's own conversion clips at 255, so most of a
  16-bit image would turn white.
- float grey (``F``): values in [0, 1] are scaled by 255, any others clipped to [0, 255].
- anything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``): PIL's
  ``convert("RGB")``.

Sizes (:func:`check_size`), measured on every family's processor (``tests/
test_dataset_source.py``): tiny images, down to 1 x 1, are resized up by every processor and
pass. Rejected: an aspect ratio (long side / short side) above :data:`MAX_ASPECT` = 200, which
the Qwen2-VL and Qwen2.5-VL processors refuse, and more than :data:`MAX_PIXELS` pixels (PIL's
decompression-bomb limit). Errors name ``where`` (the file or dataset row) and the size.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)  # what transparent pixels become
MAX_ASPECT = 200.0  # Qwen2-VL's smart_resize raises above this ratio of long to short side
MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT_GREY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")


def to_rgb(image: Any) -> Image.Image:
    """``image`` as an RGB PIL image (rules in the module docstring).

    Raises:
        ValueError: ``image`` is not a PIL image, or PIL cannot convert its mode.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _INT_GREY:
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        finite = grey[np.isfinite(grey)]
        scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
        return _grey_to_rgb(np.nan_to_num(grey) * scale)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        # Premultiplied modes (RGBa, La) and LA/PA go through RGBA, the one mode PIL composites.
        rgba = image.convert("RGBA") if mode != "La" else image.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {err}") from None


def as_rgb(images: Any) -> list[Any]:
    """One image or a list/tuple of them as a list, each PIL image through :func:`to_rgb` (what
    a model is handed); anything else (a tensor, a stand-in) passes as it is."""
    flat = list(images) if isinstance(images, list | tuple) else [images]
    return [to_rgb(im) if isinstance(im, Image.Image) else im for im in flat]


def check_size(size: tuple[int, int], *, where: str, what: str = "image") -> None:
    """Rejects a ``(width, height)`` that a processor cannot take (module docstring).

    Raises:
        ValueError: ``<where>: <what> of W x H pixels ...``.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{where}: empty {what} ({width} x {height} pixels)")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{where}: {what} of {width} x {height} pixels is larger than {MAX_PIXELS} pixels "
            "(PIL's decompression-bomb limit); downscale it"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise ValueError(
            f"{where}: {what} of {width} x {height} pixels has aspect ratio {ratio:.0f}, above "
            f"{MAX_ASPECT:.0f} (the Qwen2-VL processors refuse it); crop or pad it"
        )


def _open(data: bytes, *, where: str, what: str) -> Image.Image:
    """Opens (header only) and size-checks encoded image bytes."""
    if not data:
        raise ValueError(f"{where}: empty {what} (no bytes)")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x PIL's limit PIL only warns; check_size rejects it with the size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ValueError(f"{where}: {what} too large: {err}") from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise ValueError(f"{where}: unreadable {what}: {type(err).__name__}: {err}") from None
    check_size(image.size, where=where, what=what)
    return image


def decode(data: bytes, *, where: str, what: str = "image") -> Image.Image:
    """The fully decoded image of ``data``, size-checked (not converted).

    Args:
        data: encoded image bytes (any format PIL reads).
        where: the file or dataset row, first in every message.
        what: how messages call the image, e.g. ``"image needed by questions [...]"``.

    Raises:
        ValueError: naming ``where`` when the bytes are empty, not an image, truncated, or of a
            size a processor cannot take.
    """
    image = _open(data, where=where, what=what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # full decode: truncated files pass open() but fail here
    except Exception as err:
        raise ValueError(f"{where}: unreadable {what}: {type(err).__name__}: {err}") from None
    return image


def rgb_bytes(data: bytes, *, where: str, verify: bool = True, what: str = "image") -> bytes:
    """Encoded bytes of an RGB image: ``data`` itself when it already is one, else a PNG of
    :func:`to_rgb` of it. Keeping RGB files as they are avoids re-encoding JPEGs (lossy).

    Args:
        data: encoded image bytes (any format PIL reads).
        where: the file or dataset row, quoted in errors.
        verify: decode an RGB image fully (non-RGB ones are always decoded to convert them).
        what: how messages call the image (:func:`decode`).

    Raises:
        ValueError: as :func:`decode`, or a mode PIL cannot convert.
    """
    image = _open(data, where=where, what=what)
    if image.mode == "RGB" and not verify:
        return data
    image = decode(data, where=where, what=what)
    if image.mode == "RGB":
        return data
    try:
        rgb = to_rgb(image)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()
