"""The multi-turn dialogue dataset: one row per dialogue, stored as Arrow with ``datasets``.

Every dataset in the project (the synthetic world, MT-GQA, MT-VQA-v2, your own) has exactly the
columns of ``FEATURES`` (``dialogue_id``, ``source``, ``image_id``, ``image``, ``questions``,
``answers``, ``answer_sets``, ``question_types``, ``targets``; their types and meaning are in
docs/contracts.md and the README's "The dataset schema"), so training, evaluation and DVC treat
them alike. A dialogue always has :data:`TURNS` = 3 turns; the image belongs to the first turn.

``validate`` raises ``ValueError`` naming ``where``, the column and the row (never paging in image
bytes); ``save`` validates, then publishes atomically (``mc_core.io.staged_dir``; the folder of
``save_to_disk``, written by ``mc_core.data.saving`` without mapping the whole dataset into
memory); ``load`` reads and validates; ``row``
decodes one row (an undecodable image is a ValueError naming it); ``is_saved_dataset`` tells a
``save_to_disk`` folder. What the builders share (grouping questions into dialogues, image
sources, fingerprints) is ``mc_core.data.assemble``.
"""

from __future__ import annotations

import os
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
    from mc_core.data import residency

    seen: dict[str, int] = {}
    files = residency.dataset_files(ds)
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
        if files:  # the pages read of a mapped dataset need not stay resident
            residency.release(files)
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
    """Per row, ``{"bytes": b"<n bytes>" or None, "path": ...}`` without reading image bytes.

    Chunk by chunk: combining the chunks would copy every image, and reading the lengths needs
    only the offsets, so the image bytes of a memory-mapped dataset are never paged in (its
    resident memory stays flat however large the dataset; ``bench.data_scale``).
    """
    import pyarrow.compute as pc

    out: list[dict[str, Any] | None] = []
    for chunk in getattr(col, "chunks", [col]):
        has_bytes = pc.fill_null(
            pc.greater(pc.binary_length(pc.struct_field(chunk, "bytes")), 0), False
        ).to_pylist()
        paths = pc.struct_field(chunk, "path").to_pylist()
        valid = chunk.is_valid().to_pylist()
        out.extend(
            {"bytes": b"<bytes>" if b else None, "path": p} if v else None
            for v, b, p in zip(valid, has_bytes, paths, strict=True)
        )
    return out


def row(ds: datasets.Dataset, index: int) -> dict[str, Any]:
    """Row ``index`` of a dialogue dataset, its image decoded; ValueError naming the row and its
    ``dialogue_id`` when the image bytes do not decode (a dataset not written by a builder,
    which decode every image once). Every few rows the pages read stop counting in resident
    memory (:mod:`mc_core.data.residency`)."""
    from mc_core.data import residency

    try:
        out = ds[int(index)]
    except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on bad bytes
        did = ds.select_columns(["dialogue_id"])[int(index)]["dialogue_id"]
        raise ValueError(
            f"dataset row {index} (dialogue_id={did!r}): cannot decode its image: "
            f"{type(err).__name__}: {err}. Rebuild the dataset (dvc repro prepare)"
            " or drop that row"
        ) from err
    residency.after_read(ds)  # an epoch would otherwise map the whole dataset into memory
    return out


def save(ds: datasets.Dataset, path: str | os.PathLike) -> Path:
    """Validates ``ds`` and writes it to ``path`` atomically (temp folder, then swap).

    An existing dataset at ``path`` is replaced only once the new one is complete.

    Returns:
        The path written.
    """
    from mc_core.data.saving import save_to_disk

    path = Path(path)
    validate(ds, where=f"dataset to save at {path}")
    with staged_dir(path) as tmp:
        save_to_disk(ds, tmp)  # ds.save_to_disk's folder, in bounded resident memory
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


def is_saved_dataset(path: Path) -> bool:
    """True when ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file()
