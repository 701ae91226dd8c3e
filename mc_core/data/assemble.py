"""Assembling dialogue datasets from real sources: what the builders (``gqa``, ``vqav2``,
``dataset``) share beyond the schema itself.

Grouping an image's question ids into dialogues (``group_turns``, ``id_sort_key``), a seeded
subset (``take_subset``), planned dialogues kept compact until a row is needed (``LazyRows``),
images by id from a folder or a saved image dataset (``ImageSource``, ``read_image_bytes``,
``check_image_bytes``), change stamps for fingerprints (``file_stamp``), and materialising rows
into a validated Arrow dataset (``dataset_from_rows``, ``build_from_plans``). The rows follow
``mc_core.data.schema``.

Memory (issue 26, "Data at scale"): a build holds the compact plan (a few hundred bytes per
question) and one image at a time; rows are written by a generator and the fingerprint is hashed
plan by plan, so neither every row nor every image is in memory at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Features

from mc_core.data import residency
from mc_core.data.schema import FEATURES, TURNS, is_saved_dataset, validate

__all__ = [
    "ImageSource",
    "LazyRows",
    "build_from_plans",
    "check_image_bytes",
    "dataset_from_rows",
    "file_stamp",
    "group_turns",
    "id_sort_key",
    "read_image_bytes",
    "take_subset",
]


def group_turns(ids: Sequence[str], turns: int = TURNS) -> list[tuple[str, ...]]:
    """Consecutive groups of ``turns`` ids; the last ``len(ids) % turns`` are dropped.

    >>> group_turns(["1", "2", "3", "4", "5", "6", "7"])
    [('1', '2', '3'), ('4', '5', '6')]
    """
    usable = len(ids) - len(ids) % turns
    return [tuple(ids[i : i + turns]) for i in range(0, usable, turns)]


def id_sort_key(qid: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then any others in string order (deterministic)."""
    return (0, int(qid), qid) if qid.isdigit() else (1, 0, qid)


class LazyRows(Sequence[dict[str, Any]]):
    """Planned dialogues built on access: ``row(key)`` for each compact key.

    A plan of dicts costs about 1.5 KB per dialogue (the lists, the dict, the id string); the
    keys (an image id, an index, the question ids) a tenth of that, and ``build_from_plans``
    needs only one row at a time.
    """

    def __init__(self, keys: list[Any], row: Callable[[Any], dict[str, Any]]):
        self.keys = keys
        self.row = row

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index):  # Sequence's (int -> row, slice -> list of rows)
        if isinstance(index, slice):
            return [self.row(k) for k in self.keys[index]]
        return self.row(self.keys[index])

    def take(self, indices: Iterable[int]) -> LazyRows:
        """The rows at ``indices`` (e.g. ``take_subset``'s), still lazy."""
        return LazyRows([self.keys[i] for i in indices], self.row)


def read_image_bytes(path: Path, *, row: str, verify: bool = True) -> bytes:
    """Reads an image file, decoding it fully when ``verify`` so corrupt files fail here.

    Args:
        path: the image file.
        row: the dataset row(s) needing it (question ids), quoted in the error.
        verify: decode the image with PIL.

    Raises:
        ValueError: naming the file and ``row`` when the file is missing or undecodable.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read image needed by {row}: {e}") from e
    if verify:
        check_image_bytes(data, where=str(path), row=row)
    return data


def check_image_bytes(data: bytes, *, where: str, row: str) -> None:
    """Decodes ``data`` with PIL and checks its size (``mc_core.data.images``); ValueError
    naming ``where`` and ``row`` when it fails."""
    from mc_core.data import images

    images.decode(data, where=where, what=f"image needed by {row}")


def take_subset(n: int, max_items: int | None, seed: int, *, where: str) -> list[int]:
    """Indices of a seeded random subset of ``range(n)`` of size ``max_items``, sorted.

    Sorting keeps the canonical order (dialogues of one image stay together). ``None`` or
    ``max_items >= n`` keeps everything.
    """
    import random

    if max_items is None or max_items >= n:
        return list(range(n))
    if not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"{where}: max_dialogues must be a positive integer, got {max_items!r}")
    return sorted(random.Random(seed).sample(range(n), max_items))


def dataset_from_rows(
    rows: Callable[[], Iterator[dict[str, Any]]],
    *,
    fingerprint: str,
    cache_dir: str | os.PathLike | None,
    where: str,
    features: Features = FEATURES,
) -> datasets.Dataset:
    """Materialises dialogue rows into an Arrow-backed dataset, streaming (bounded memory).

    Args:
        rows: a zero-argument generator function yielding rows of the schema.
        fingerprint: a digest of everything the rows depend on (inputs, options, file stats):
            the ``datasets`` cache is keyed by it, so a changed input never hits a stale cache.
        cache_dir: where ``datasets`` writes the Arrow shards (default: its own cache).
        where: quoted in validation errors.
        features: the rows' features (:data:`FEATURES`, plus any :data:`OPTIONAL_FEATURES`).
    """
    ds = datasets.Dataset.from_generator(
        rows,
        features=features,
        cache_dir=None if cache_dir is None else str(cache_dir),
        fingerprint=fingerprint,
    )
    return validate(ds, where=where)


def file_stamp(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file: cheap change detection for fingerprints."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1))
    return out


class ImageSource:
    """Image bytes by image id, from a folder of files or a ``save_to_disk`` dataset.

    Args:
        root: a folder of image files, or a saved dataset with an id column (``id``,
            ``image_id`` or ``imageId``) and an ``image`` column (layout of e.g. the
            ``*_images`` configurations of GQA on the Hugging Face hub).
        filename: maps an image id to its file name inside a folder.
    """

    ID_COLUMNS = ("id", "image_id", "imageId")

    def __init__(self, root: str | os.PathLike, filename: Callable[[str], str]):
        self.root = Path(root)
        self.filename = filename
        self._ds = None
        self._index: dict[str, int] = {}
        if is_saved_dataset(self.root):
            ds = datasets.load_from_disk(str(self.root))
            if not isinstance(ds, datasets.Dataset):
                raise ValueError(
                    f"{self.root}: expected one dataset of images, got {type(ds).__name__}"
                )
            id_col = next((c for c in self.ID_COLUMNS if c in ds.column_names), None)
            if id_col is None or "image" not in ds.column_names:
                raise ValueError(
                    f"{self.root}: an image dataset needs an id column (one of "
                    f"{list(self.ID_COLUMNS)}) and 'image'; has {ds.column_names}"
                )
            self._ds = ds.cast_column("image", datasets.Image(decode=False))
            self._index = {str(v): i for i, v in enumerate(ds[id_col])}
        elif not self.root.is_dir():
            raise ValueError(f"{self.root}: image folder not found")

    def locate(self, image_id: str) -> str:
        """Where the image lives, for messages and fingerprints."""
        if self._ds is None:
            return str(self.root / self.filename(image_id))
        return f"{self.root} (image id {image_id!r})"

    def stamp(self, image_ids: Iterable[str]) -> Iterator[tuple[str, int, int]]:
        """Change-detection stamps of the files behind ``image_ids``, one at a time."""
        if self._ds is None:
            for i in image_ids:
                yield from file_stamp([self.root / self.filename(i)])
        else:
            yield from file_stamp(sorted(p for p in self.root.iterdir() if p.is_file()))

    def read(self, image_id: str, *, row: str, verify: bool) -> bytes:
        """The image's encoded bytes; ValueError naming the file/dataset and ``row``."""
        if self._ds is None:
            return read_image_bytes(self.root / self.filename(image_id), row=row, verify=verify)
        where = self.locate(image_id)
        if image_id not in self._index:
            raise ValueError(f"{where}: no such image in the dataset, needed by {row}")
        cell = self._ds[self._index[image_id]]["image"]
        residency.after_read(self._ds)  # every image is read: keep them from staying mapped
        if cell is None:
            raise ValueError(f"{where}: empty image cell, needed by {row}")
        data = cell.get("bytes")
        if not data and cell.get("path"):
            return read_image_bytes(Path(cell["path"]), row=row, verify=verify)
        if not data:
            raise ValueError(f"{where}: empty image cell, needed by {row}")
        if verify:
            check_image_bytes(data, where=where, row=row)
        return data


def build_from_plans(
    plans: Sequence[dict[str, Any]],
    images: ImageSource,
    *,
    fingerprint_parts: Any,
    verify_images: bool,
    cache_dir: str | os.PathLike | None,
    where: str,
) -> datasets.Dataset:
    """Turns planned dialogues (rows without ``image``, plus ``qids``) into a dataset.

    Every image is read (and decoded, when ``verify_images``) once before anything is written,
    so a missing or corrupt image fails fast with the file and the question ids needing it; one
    image at a time is in memory, then and while writing.
    Images that are not RGB are stored converted (``mc_core.data.images.rgb_bytes``).

    Args:
        plans: rows of the schema without ``image``, each with ``qids`` (the question ids of its
            turns, for messages); dialogues of one image must be consecutive.
        images: where the images come from.
        fingerprint_parts: JSON-serialisable description of the inputs and options.
        verify_images: decode each image once with PIL.
        cache_dir: ``datasets`` cache folder for the Arrow shards.
        where: quoted in errors.
    """
    if not plans:
        raise ValueError(
            f"{where}: no dialogue to build (every image has fewer than "
            f"{TURNS} questions, or the input is empty)"
        )
    for image_id, row in _image_runs(plans):
        images.read(image_id, row=row, verify=verify_images)
    digest = _digest(fingerprint_parts, images, plans)

    from mc_core.data.images import rgb_bytes

    def rows() -> Iterator[dict[str, Any]]:
        last_id, last_bytes = None, b""
        for p in plans:
            if p["image_id"] != last_id:
                last_id = p["image_id"]
                needed_by = f"questions {list(p['qids'])}"
                data = images.read(last_id, row=needed_by, verify=False)
                # Grey/CMYK/palette images (COCO has some) are stored as RGB PNGs, RGB as is.
                where, what = images.locate(last_id), f"image needed by {needed_by}"
                last_bytes = rgb_bytes(data, where=where, verify=False, what=what)
            row = {k: v for k, v in p.items() if k != "qids"}
            row["image"] = {"bytes": last_bytes, "path": None}
            yield row

    return dataset_from_rows(rows, fingerprint=digest, cache_dir=cache_dir, where=where)


def _image_runs(plans: Sequence[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(image id, the question ids of its first dialogue) per run of one image's dialogues."""
    last = None
    for p in plans:
        if p["image_id"] != last:
            last = p["image_id"]
            yield last, f"questions {list(p['qids'])}"


def _digest(parts: Any, images: ImageSource, plans: Sequence[dict[str, Any]]) -> str:
    """A digest of the options, the image files' stamps and every planned row, hashed piece by
    piece (one JSON document of every plan would be the biggest object of a large build)."""
    import hashlib
    import json

    def dumps(x: Any) -> bytes:
        return json.dumps(x, sort_keys=True, default=str).encode() + b"\n"

    h = hashlib.sha256(dumps(parts))
    for stamp in images.stamp(image_id for image_id, _ in _image_runs(plans)):
        h.update(dumps(stamp))
    for p in plans:
        h.update(dumps(p))
    return h.hexdigest()[:32]
