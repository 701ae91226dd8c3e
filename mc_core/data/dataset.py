"""``source: dataset``: your own multi-turn dialogues, from a folder written by ``save_to_disk``.

Input: one ``datasets.Dataset`` saved with ``Dataset.save_to_disk`` (or
:func:`mc_core.data.schema.save`) with the columns of :data:`mc_core.data.schema.FEATURES`
(``object_centres`` optional, nothing else). ``string`` columns may also be ``large_string``
and lists ``LargeList``; ``image`` must be a ``datasets.Image`` column whose cells hold the
bytes or a file path (a relative path is tried from the working directory, then from the
folder). ``source`` is ``"dataset"`` for your own rows (answer sets: one answer = exact match,
several = VQA soft accuracy) or a builder's name when the rows follow that builder's rules.
``docs/data.md`` has an example.

Everything is checked before anything is written, with errors naming the folder, the row index
(and ``dialogue_id``) and the column: the columns and their types, then every row's text
(as many answers, answer sets, question types and targets as questions; exactly
:data:`~mc_core.data.schema.TURNS` turns; unique ids), then the image of every row taken
(decoded once; sizes and modes as :mod:`mc_core.data.images` says). A ``max_dialogues`` subset
is a seeded random choice of rows, kept in folder order; only its images are decoded.

The result is a new dataset: the rows taken, images embedded as RGB (RGB files kept byte for
byte, others converted to PNG by :func:`mc_core.data.images.rgb_bytes`).

Check a folder: ``python -m mc_core.data.dataset /data/my-dialogues [--dialogues N --seed S]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from mc_core.data import images as image_rules
from mc_core.data import residency
from mc_core.data.assemble import dataset_from_rows, file_stamp, take_subset
from mc_core.data.schema import (
    COLUMNS,
    FEATURES,
    OPTIONAL_FEATURES,
    TURNS,
    check_row,
    image_presence,
    is_saved_dataset,
)

SOURCE = "dataset"
_VERSION = 1  # bump when the output rows change for the same input (keys the datasets cache)
_PER_TURN = (
    ("answers", "answers"),
    ("answer_sets", "answer sets"),
    ("question_types", "question types"),
    ("targets", "targets"),
)


def _kind(feature: Any) -> str:
    """A feature's type as the checks compare it: string widths and list kinds folded."""
    if isinstance(feature, datasets.Value):
        return "string" if feature.dtype in ("string", "large_string") else feature.dtype
    if isinstance(feature, datasets.List | datasets.LargeList):
        return f"list<{_kind(feature.feature)}>"
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, dict):
        return "struct"
    return type(feature).__name__


_EXPECTED = {col: {_kind(f)} for col, f in FEATURES.items()}
_EXPECTED["object_centres"] = {"list<list<float32>>", "list<list<float64>>"}


def _fail(where: str, index: int, did: Any, column: str, msg: str) -> None:
    ident = f" (dialogue_id={did!r})" if did else ""
    raise ValueError(f"{where}: row {index}{ident}: column {column!r}: {msg}")


def open_folder(path: str | os.PathLike) -> datasets.Dataset:
    """The saved dataset at ``path``, its columns and column types checked (rows are not).

    Raises:
        ValueError: naming the folder: not a saved ``Dataset`` (a ``DatasetDict`` names its
            splits), or missing, unexpected or mistyped columns.
    """
    path = Path(path)
    where = str(path)
    if not path.is_dir():
        raise ValueError(f"{where}: no such folder (source: dataset reads a save_to_disk folder)")
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = ["<split>"]
        raise ValueError(
            f"{where}: holds a DatasetDict with splits {splits}; set path to one split's "
            f"folder, e.g. {path / str(splits[0])}"
        )
    if not is_saved_dataset(path):
        raise ValueError(f"{where}: not a folder written by Dataset.save_to_disk (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: unreadable state.json: {err}") from err
    if isinstance(state, dict) and state.get("_data_files") == []:
        # datasets itself cannot load a saved empty dataset (IndexError): say what it is.
        raise ValueError(f"{where}: the dataset has no rows")
    try:
        ds = datasets.load_from_disk(where)
    except Exception as err:  # datasets/pyarrow raise many types on damaged folders
        raise ValueError(f"{where}: cannot load the dataset: {type(err).__name__}: {err}") from err
    have = list(ds.column_names)
    missing = [c for c in COLUMNS if c not in have]
    extra = [c for c in have if c not in COLUMNS and c not in OPTIONAL_FEATURES]
    if missing or extra:
        raise ValueError(
            f"{where}: columns differ from the dialogue schema (docs/data.md): missing {missing}, "
            f"unexpected {extra}" + (f" (drop them: ds.remove_columns({extra}))" if extra else "")
        )
    for col in have:
        kind = _kind(ds.features[col])
        if kind not in _EXPECTED[col]:
            want = " or ".join(sorted(_EXPECTED[col]))
            hint = " (ds.cast_column('image', datasets.Image()))" if col == "image" else ""
            raise ValueError(f"{where}: column {col!r}: type {kind}, expected {want}{hint}")
    return ds


def _check_turns(row: dict[str, Any], *, where: str, index: int) -> None:
    """Per-turn columns as long as ``questions``, and :data:`TURNS` turns."""
    did = row.get("dialogue_id")
    questions = row["questions"]
    if not isinstance(questions, list) or not questions:
        _fail(where, index, did, "questions", f"expected a list of questions, got {questions!r}")
    n = len(questions)
    for col, noun in _PER_TURN:
        value = row[col]
        if isinstance(value, list) and len(value) != n:
            _fail(where, index, did, col, f"{len(value)} {noun} for {n} questions")
    if n != TURNS:
        _fail(
            where,
            index,
            did,
            "questions",
            f"{n} turns; dialogues here have exactly {TURNS} (cut longer ones into "
            f"{TURNS}-turn dialogues, each with its image)",
        )


def check_rows(ds: datasets.Dataset, *, where: str) -> None:
    """Checks the text of every row and that each has an image cell (none decoded).

    Raises:
        ValueError: naming ``where``, the row index, its ``dialogue_id`` and the column.
    """
    text = [c for c in COLUMNS if c != "image"]
    centres = "object_centres" in ds.column_names
    seen: dict[str, int] = {}
    start = 0
    for batch in ds.with_format("arrow").iter(batch_size=1000):
        cols = {c: batch.column(c).to_pylist() for c in text}
        if centres:
            cols["object_centres"] = batch.column("object_centres").to_pylist()
        cells = image_presence(batch.column("image"))
        for k in range(batch.num_rows):
            i = start + k
            row = {c: cols[c][k] for c in text}
            row["image"] = cells[k]
            _check_turns(row, where=where, index=i)
            check_row(row, where=where, index=i)
            did = row["dialogue_id"]
            if did in seen:
                _fail(where, i, did, "dialogue_id", f"duplicate (first at row {seen[did]})")
            seen[did] = i
            if centres:
                _check_centres(cols["object_centres"][k], where=where, index=i, did=did)
        start += batch.num_rows


def _check_centres(centres: Any, *, where: str, index: int, did: Any) -> None:
    """Optional ``object_centres``: (row, col) pairs in the unit square (the selector ceiling
    reads them as fractions of the image)."""
    for c in centres or []:
        if not isinstance(c, list) or len(c) != 2 or not all(0.0 <= v <= 1.0 for v in c):
            _fail(where, index, did, "object_centres", f"centre {c!r} is not (row, col) in [0, 1]")


def _image_bytes(cell: Any, *, folder: Path, where: str) -> tuple[bytes, str, Path | None]:
    """The encoded bytes of an image cell, where they came from (for messages) and the file
    they were read from (None: embedded bytes)."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"], where, None
    path = cell.get("path") if isinstance(cell, dict) else None
    if not path:
        raise ValueError(f"{where}: no image (neither bytes nor a path): {cell!r}")
    file = Path(path)
    if not file.is_absolute() and not file.exists() and (folder / file).exists():
        file = folder / file  # relative to the dataset folder, where such files usually sit
    where = f"{where} (file {file})"
    try:
        return file.read_bytes(), where, file
    except OSError as err:
        raise ValueError(f"{where}: cannot read the image file: {err}") from None


def build(
    path: str | os.PathLike,
    *,
    max_dialogues: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """The dialogues of a saved dataset folder, checked, subset and with RGB images.

    Args:
        path: a folder written by ``Dataset.save_to_disk`` in the dialogue schema.
        max_dialogues: keep a seeded random subset of this many rows (None: all).
        seed: the subset's seed.
        cache_dir: ``datasets`` cache folder for the Arrow shards.

    Raises:
        ValueError: naming the folder, the row index and the column (module docstring).
    """
    folder = Path(path)
    where = str(folder)
    ds = open_folder(folder)
    if len(ds) == 0:
        raise ValueError(f"{where}: the dataset has no rows")
    check_rows(ds, where=where)
    keep = take_subset(len(ds), max_dialogues, seed, where=where)
    raw = ds.cast_column("image", datasets.Image(decode=False))  # metadata only, no rewrite
    optional = [c for c in OPTIONAL_FEATURES if c in ds.column_names]

    def image(i: int, rec: dict[str, Any], *, verify: bool) -> tuple[bytes, Path | None]:
        at = f"{where}: row {i} (dialogue_id={rec['dialogue_id']!r}): column 'image'"
        data, at, file = _image_bytes(rec["image"], folder=folder, where=at)
        return image_rules.rgb_bytes(data, where=at, verify=verify), file

    linked: list[Path] = []  # image files cells point to: their changes must miss the cache
    for i in keep:  # decode every image taken once, before anything is written
        _, file = image(i, raw[i], verify=True)
        residency.after_read(raw)  # the rows read need not stay mapped
        if file is not None:
            linked.append(file)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    fingerprint = getattr(ds, "_fingerprint", None)  # changes when the folder is re-saved
    parts = [SOURCE, _VERSION, max_dialogues, seed, str(folder.resolve()), fingerprint]
    parts += [file_stamp(files), file_stamp(linked)]
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]

    def rows() -> Iterator[dict[str, Any]]:
        for i in keep:
            rec = raw[i]
            residency.after_read(raw)
            row = {c: rec[c] for c in (*COLUMNS, *optional) if c != "image"}
            # Embedded bytes, no path: the output stands alone.
            row["image"] = {"bytes": image(i, rec, verify=False)[0], "path": None}
            yield row

    features = datasets.Features({**FEATURES, **{c: OPTIONAL_FEATURES[c] for c in optional}})
    return dataset_from_rows(
        rows, fingerprint=digest, cache_dir=cache_dir, where=where, features=features
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mc_core.data.dataset PATH``: check a folder, print how many rows it gives."""
    ap = argparse.ArgumentParser(prog="python -m mc_core.data.dataset", description=__doc__)
    ap.add_argument("path", help="folder written by Dataset.save_to_disk")
    ap.add_argument("--dialogues", type=int, default=None, help="seeded subset size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", help="datasets cache folder for the Arrow shards")
    args = ap.parse_args(argv)
    try:
        ds = build(
            args.path, max_dialogues=args.dialogues, seed=args.seed, cache_dir=args.cache_dir
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.path}: {len(ds)} dialogues over {len(set(ds['image_id']))} images, all valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
