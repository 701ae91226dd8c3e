"""The multi-turn dialogue dataset: one row per dialogue, stored as Arrow with ``datasets``.

Every dataset in the project (the synthetic world, MT-GQA, MT-VQA-v2) has exactly these
columns, so training, evaluation and DVC treat them alike:

==================  ===========================  ==============================================
column              type                         meaning
==================  ===========================  ==============================================
``dialogue_id``     ``str``                      unique within the dataset, stable across builds
``source``          ``str``                      ``"synthetic"``, ``"gqa"``, ``"vqav2"`` or
                                                 ``"dataset"`` (your own, ``docs/data.md``)
``image_id``        ``str``                      the image's id in its source (several dialogues
                                                 may share one image)
``image``           ``datasets.Image``           the image, bytes embedded (self-contained)
``questions``       ``list[str]`` (3)            the question of each turn, in order
``answers``         ``list[str]`` (3)            the canonical answer of each turn
``answer_sets``     ``list[list[str]]`` (3 x k)  per turn, the answers accepted by the metric:
                                                 the ten human answers for VQAv2 (VQA soft
                                                 accuracy), else ``[answer]`` (exact match);
                                                 ``"dataset"``: any non-empty list (one answer:
                                                 ``[answer]``, exact match; more: VQA soft
                                                 accuracy)
``question_types``  ``list[str]`` (3)            per turn, non-empty (GQA: structural type;
                                                 VQAv2: answer type; synthetic: its own)
``targets``         ``list[str]`` (3)            per turn, the region or attribute the turn is
                                                 about, ``""`` when unknown
==================  ===========================  ==============================================

A dialogue always has :data:`TURNS` = 3 turns; the image belongs to the first turn only.

API:
    ``FEATURES``: the ``datasets.Features`` of a dialogue row.
    ``validate(ds, where=...)``: raises ``ValueError`` naming ``where``, the column and the row.
    ``save(ds, path)``: validates, then ``save_to_disk`` into a temporary folder beside ``path``
    and swaps it in (``mc_core.io.staged_dir``: nothing half-written is ever at ``path``).
    ``load(path)``: ``load_from_disk`` + ``validate``.
    ``row(ds, i)``: one row, decoded; an undecodable image is a ValueError naming the row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value

from mc_core.io import staged_dir

TURNS = 3
# "dataset": dialogues you bring as a saved dataset (mc_core.data.dataset, docs/data.md).
SOURCES = ("synthetic", "gqa", "vqav2", "dataset")
VQA_ANSWERS = 10  # VQAv2 collects ten human answers per question

FEATURES = Features(
    {
        "dialogue_id": Value("string"),
        "source": Value("string"),
        "image_id": Value("string"),
        "image": datasets.Image(),
        "questions": List(Value("string")),
        "answers": List(Value("string")),
        "answer_sets": List(List(Value("string"))),
        "question_types": List(Value("string")),
        "targets": List(Value("string")),
    }
)
COLUMNS = tuple(FEATURES)
# Optional columns: a dataset may carry them (validated when present), none may require them.
# object_centres: per object, its centre (row, col) in [0, 1] of the image (the synthetic world
# knows them; real builders do not), the ground truth of the selector ceiling.
OPTIONAL_FEATURES = Features({"object_centres": List(List(Value("float32")))})
_PER_TURN = ("questions", "answers", "answer_sets", "question_types", "targets")


def _fail(
    where: str,
    msg: str,
    *,
    row: int | None = None,
    column: str | None = None,
    dialogue_id: Any = None,
) -> None:
    parts = [str(where)]
    if row is not None:
        parts.append(f"row {row}" + (f" (dialogue_id={dialogue_id!r})" if dialogue_id else ""))
    if column is not None:
        parts.append(f"column {column!r}")
    raise ValueError(": ".join(parts) + ": " + msg)


def _check_str_list(value: Any, *, allow_empty: bool) -> str | None:
    """Returns a problem description, or None when ``value`` is TURNS strings."""
    if not isinstance(value, list) or len(value) != TURNS:
        n = len(value) if isinstance(value, list) else type(value).__name__
        return f"expected a list of {TURNS} strings, got {n!r} ({value!r})"
    for t, s in enumerate(value):
        if not isinstance(s, str):
            return f"turn {t}: expected a string, got {s!r}"
        if not allow_empty and not s.strip():
            return f"turn {t}: empty string"
    return None


def check_row(row: dict[str, Any], *, where: str, index: int) -> None:
    """Checks one dialogue row (a plain dict; ``image`` may be a dict, PIL image or None).

    Args:
        row: the row, columns as in :data:`FEATURES`.
        where: where the row came from (a path, a builder), quoted in the error.
        index: the row's index, quoted in the error.

    Raises:
        ValueError: naming ``where``, the row index, the dialogue id and the column.
    """
    did = row.get("dialogue_id")
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        _fail(where, f"missing columns {missing}", row=index, dialogue_id=did)

    def fail(column: str, msg: str) -> None:
        _fail(where, msg, row=index, column=column, dialogue_id=did)

    for col in ("dialogue_id", "image_id"):
        if not isinstance(row[col], str) or not row[col].strip():
            fail(col, f"expected a non-empty string, got {row[col]!r}")
    if row["source"] not in SOURCES:
        fail("source", f"{row['source']!r} is not one of {list(SOURCES)}")
    image = row["image"]
    empty_cell = isinstance(image, dict) and not image.get("bytes") and not image.get("path")
    if image is None or empty_cell:
        fail("image", f"no image (got {image!r})")
    for col, allow_empty in (
        ("questions", False),
        ("answers", False),
        ("question_types", False),
        ("targets", True),
    ):
        problem = _check_str_list(row[col], allow_empty=allow_empty)
        if problem:
            fail(col, problem)
    sets = row["answer_sets"]
    if not isinstance(sets, list) or len(sets) != TURNS:
        fail("answer_sets", f"expected {TURNS} lists of answers, got {sets!r}")
    for t, (answer, accepted) in enumerate(zip(row["answers"], sets, strict=True)):
        if not isinstance(accepted, list) or not all(isinstance(a, str) for a in accepted):
            fail("answer_sets", f"turn {t}: expected a list of strings, got {accepted!r}")
        if row["source"] == "dataset" and len(accepted) != 1:
            # Several accepted answers: scored by VQA soft accuracy (mc_core.evaluation.runner).
            if not accepted:
                fail("answer_sets", f"turn {t}: empty list of accepted answers")
        elif row["source"] == "vqav2":
            if len(accepted) != VQA_ANSWERS:
                fail(
                    "answer_sets",
                    f"turn {t}: VQAv2 needs {VQA_ANSWERS} human answers, got {len(accepted)}",
                )
        elif accepted != [answer]:
            fail(
                "answer_sets",
                f"turn {t}: expected [answer] = {[answer]!r} for source "
                f"{row['source']!r}, got {accepted!r}",
            )


def validate(ds: datasets.Dataset, *, where: str) -> datasets.Dataset:
    """Checks that ``ds`` is a dialogue dataset: columns, feature types and every row.

    Images are checked for presence, not decoded (the builders decode each one once).

    Args:
        ds: the dataset.
        where: where it came from (a path, a builder name), quoted in every error.

    Returns:
        ``ds`` itself, for chaining.

    Raises:
        ValueError: naming ``where``, the column and (for row problems) the row index.
    """
    if not isinstance(ds, datasets.Dataset):
        _fail(where, f"expected a datasets.Dataset of dialogues, got {type(ds).__name__}")
    have = set(ds.column_names)
    missing = [c for c in COLUMNS if c not in have]
    extra = sorted(have - set(COLUMNS) - set(OPTIONAL_FEATURES))
    if missing or extra:
        _fail(
            where, f"columns differ from the dialogue schema: missing {missing}, unexpected {extra}"
        )
    expected = {**FEATURES, **OPTIONAL_FEATURES}
    for col in ds.column_names:
        if ds.features[col] != expected[col]:
            _fail(
                where, f"feature type {ds.features[col]!r}, expected {expected[col]!r}", column=col
            )
    if "object_centres" in have:
        _check_centres(ds["object_centres"], where)
    seen: dict[str, int] = {}
    # Arrow batches: no image decoding, and indices mappings (select/shuffle) are honoured.
    arrow = ds.with_format("arrow")
    start = 0
    for batch in arrow.iter(batch_size=1000):
        cols = {c: batch.column(c).to_pylist() for c in COLUMNS if c != "image"}
        images = image_presence(batch.column("image"))
        for k in range(batch.num_rows):
            row = {c: cols[c][k] for c in COLUMNS if c != "image"}
            row["image"] = images[k]
            check_row(row, where=where, index=start + k)
            did = row["dialogue_id"]
            if did in seen:
                _fail(
                    where,
                    f"duplicate dialogue_id {did!r} (first at row {seen[did]})",
                    row=start + k,
                    column="dialogue_id",
                )
            seen[did] = start + k
        start += batch.num_rows
    return ds


def _check_centres(column: list, where: str) -> None:
    """Every optional object centre is a (row, col) pair inside the unit square."""
    for i, centres in enumerate(column):
        for c in centres:
            if len(c) != 2 or not all(0.0 <= v <= 1.0 for v in c):
                _fail(
                    where,
                    f"object centre {c!r} is not (row, col) in [0, 1]",
                    row=i,
                    column="object_centres",
                )


def image_presence(col: Any) -> list[dict[str, Any] | None]:
    """Per row, ``{"bytes": b"<n bytes>" or None, "path": ...}`` without copying image bytes."""
    import pyarrow.compute as pc

    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    has_bytes = pc.fill_null(
        pc.greater(pc.binary_length(pc.struct_field(col, "bytes")), 0), False
    ).to_pylist()
    paths = pc.struct_field(col, "path").to_pylist()
    valid = col.is_valid().to_pylist()
    return [
        {"bytes": b"<bytes>" if b else None, "path": p} if v else None
        for v, b, p in zip(valid, has_bytes, paths, strict=True)
    ]


def row(ds: datasets.Dataset, index: int) -> dict[str, Any]:
    """Row ``index`` of a dialogue dataset, its image decoded; ValueError naming the row and its
    ``dialogue_id`` when the image bytes do not decode (a dataset not written by a builder,
    which decode every image once)."""
    try:
        return ds[int(index)]
    except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on bad bytes
        did = ds.select_columns(["dialogue_id"])[int(index)]["dialogue_id"]
        raise ValueError(
            f"dataset row {index} (dialogue_id={did!r}): cannot decode its image: "
            f"{type(err).__name__}: {err}. Rebuild the dataset (dvc repro prepare)"
            " or drop that row"
        ) from err


def save(ds: datasets.Dataset, path: str | os.PathLike) -> Path:
    """Validates ``ds`` and writes it to ``path`` atomically (temp folder, then swap).

    An existing dataset at ``path`` is replaced only once the new one is complete.

    Returns:
        The path written.
    """
    path = Path(path)
    validate(ds, where=f"dataset to save at {path}")
    with staged_dir(path) as tmp:
        ds.save_to_disk(str(tmp))
    return path


def load(path: str | os.PathLike) -> datasets.Dataset:
    """Loads a dialogue dataset written by :func:`save` and validates it.

    Raises:
        ValueError: ``path`` is not a saved dataset, or a row breaks the schema.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no dialogue dataset here (not a directory)")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: not a dataset saved with save_to_disk ({e})") from e
    return validate(ds, where=str(path))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the real builders (gqa.py, vqav2.py).


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


def is_saved_dataset(path: Path) -> bool:
    """True when ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file()


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

    def stamp(self, image_ids: Iterable[str]) -> list[tuple[str, int, int]]:
        """Change-detection stamps of the files behind ``image_ids``."""
        if self._ds is None:
            return file_stamp(self.root / self.filename(i) for i in image_ids)
        return file_stamp(sorted(p for p in self.root.iterdir() if p.is_file()))

    def read(self, image_id: str, *, row: str, verify: bool) -> bytes:
        """The image's encoded bytes; ValueError naming the file/dataset and ``row``."""
        if self._ds is None:
            return read_image_bytes(self.root / self.filename(image_id), row=row, verify=verify)
        where = self.locate(image_id)
        if image_id not in self._index:
            raise ValueError(f"{where}: no such image in the dataset, needed by {row}")
        cell = self._ds[self._index[image_id]]["image"]
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
    so a missing or corrupt image fails fast with the file and the question ids needing it.
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
    import hashlib
    import json

    if not plans:
        raise ValueError(
            f"{where}: no dialogue to build (every image has fewer than "
            f"{TURNS} questions, or the input is empty)"
        )
    needed: dict[str, str] = {}
    for p in plans:
        needed.setdefault(p["image_id"], f"questions {list(p['qids'])}")
    for image_id, row in needed.items():
        images.read(image_id, row=row, verify=verify_images)
    digest = hashlib.sha256(
        json.dumps(
            [fingerprint_parts, images.stamp(sorted(needed)), list(plans)],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:32]

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
