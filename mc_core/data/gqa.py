"""MT-GQA: multi-turn dialogues built from GQA question files.

Input, in the GQA release schema (e.g. ``testdev_balanced_questions.json``): a JSON object
``{question_id: {"imageId", "question", "answer", "fullAnswer", "types": {"structural",
"semantic", "detailed"}, "annotations": {...}, ...}}``; or a folder written by ``save_to_disk``
whose rows carry the same fields plus the question id in ``id``. Images: a folder of
``<imageId>.jpg`` files, or a saved dataset with ``id`` and ``image`` columns.

Grouping rule (what makes the paper's count): the questions of each image, sorted by question
id (numeric ids numerically), are cut into consecutive groups of three; the last
``k mod 3`` questions of an image with ``k`` questions are dropped, and questions of different
images are never mixed. The number of dialogues is therefore ``sum_images floor(k_i / 3)``,
whatever the order. For GQA testdev-balanced (12,578 questions over 398 images) the paper
reports 4,061 dialogues, i.e. 395 questions dropped, about one per image, as this rule gives
(pooling all questions would give floor(12578 / 3) = 4,192; dropping two per image at most
bounds the rule's count below by 3,928). Images are taken in id order.

Row fields: ``answers`` = the short GQA ``answer`` (``answer_sets`` = ``[answer]``, scored by
exact match); ``question_types`` = ``types["structural"]`` (verify, query, choose, logical,
compare); ``targets`` = the scene-graph object ids the question and answer annotations point
to, sorted and comma-joined (``""`` when the file has no annotations).

A training subset (the paper trains on ~20k dialogues of train-balanced) is a seeded random
choice of whole dialogues: ``build(..., max_dialogues=20000, seed=0)``.

Memory: the question file is read one record at a time (:mod:`mc_core.data.jsonstream`; train-
balanced is ~1 GB of JSON, several GB as Python objects) and only the five fields a row uses are
kept per question; dialogues stay compact keys until written, and images are read one at a time
(:func:`mc_core.data.assemble.build_from_plans`). ``bench.data_scale`` measures it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from mc_core.data.assemble import (
    ImageSource,
    LazyRows,
    build_from_plans,
    group_turns,
    id_sort_key,
    take_subset,
)
from mc_core.data.jsonstream import iter_object
from mc_core.data.schema import is_saved_dataset

SOURCE = "gqa"
# Bump when the row layout, the grouping or the image handling changes (keys the datasets
# cache); 2: non-RGB images stored as RGB.
_VERSION = 2


def iter_questions(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(question_id, record)`` pairs, one at a time, from a GQA JSON file (streamed) or a saved
    dataset folder.

    Raises:
        ValueError: naming the file (and the character position) when it is unreadable, cut
            short, malformed or not a JSON object; naming the folder when it is not one dataset
            with an ``id`` column.
    """
    path = Path(path)
    if not is_saved_dataset(path):
        yield from iter_object(path)
        return
    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.Dataset) or "id" not in ds.column_names:
        raise ValueError(
            f"{path}: expected one dataset of GQA questions with an 'id' "
            f"column, got {type(ds).__name__} "
            f"{getattr(ds, 'column_names', None)}"
        )
    for r in ds:
        yield str(r["id"]), r


def read_questions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every question record by question id (all in memory: :func:`iter_questions` streams).

    Raises:
        ValueError: as :func:`iter_questions`.
    """
    return dict(iter_questions(path))


def _text(rec: dict[str, Any], key: str, *, where: str, qid: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing field" if key not in rec else f"bad value {value!r} for field"
        raise ValueError(f"{where}: question {qid!r}: {what} {key!r}")
    return value.strip()


def _targets(rec: dict[str, Any]) -> str:
    """Scene-graph object ids referenced by the question/answer annotations."""
    ann = rec.get("annotations")
    ids: set[str] = set()
    if isinstance(ann, dict):
        for part in ann.values():
            if isinstance(part, dict):
                for v in part.values():
                    if v is None:  # Arrow-backed records fill absent keys with None
                        continue
                    ids.update(s.strip() for s in str(v).split(",") if s.strip())
    return ",".join(sorted(ids, key=id_sort_key))


class _Turn(NamedTuple):
    """What a row uses of one question record (the record itself is ~1 KB of JSON)."""

    image_id: str
    question: str
    answer: str
    type: str
    target: str


def _turns(questions: Iterable[tuple[str, dict[str, Any]]], *, where: str) -> dict[str, _Turn]:
    """The checked fields of every question, by question id, in input order (a repeated id keeps
    its last record in its first position, as ``json.load`` does)."""
    turns: dict[str, _Turn] = {}
    shared: dict[str, str] = {}  # one string per image id, answer and type, not per question
    for qid, rec in questions:
        qid = str(qid)
        if not isinstance(rec, dict):
            raise ValueError(
                f"{where}: question {qid!r}: expected an object, got {type(rec).__name__}"
            )
        types = rec.get("types")
        if not isinstance(types, dict):
            raise ValueError(f"{where}: question {qid!r}: missing field 'types'")
        image_id = _text(rec, "imageId", where=where, qid=qid)
        question = _text(rec, "question", where=where, qid=qid)
        answer = _text(rec, "answer", where=where, qid=qid)
        kind = _text(types, "structural", where=where, qid=f"{qid}'s types")
        turns[qid] = _Turn(
            shared.setdefault(image_id, image_id),
            question,
            shared.setdefault(answer, answer),
            shared.setdefault(kind, kind),
            _targets(rec),
        )
    return turns


def plan(
    questions: Mapping[str, dict[str, Any]] | Iterable[tuple[str, dict[str, Any]]],
    *,
    where: str,
) -> LazyRows:
    """The dialogues (rows without images, plus ``qids``) in canonical order, built on access.

    Args:
        questions: records by question id, or ``(question_id, record)`` pairs
            (:func:`iter_questions`), read once.
        where: quoted in errors.

    Raises:
        ValueError: naming ``where`` and the question id of a record with a missing field.
    """
    pairs = questions.items() if isinstance(questions, Mapping) else questions
    turns = _turns(pairs, where=where)
    by_image: dict[str, list[str]] = defaultdict(list)
    for qid, turn in turns.items():
        by_image[turn.image_id].append(qid)
    keys = []
    for image_id in sorted(by_image, key=id_sort_key):
        qids = sorted(by_image.pop(image_id), key=id_sort_key)
        keys.extend((image_id, j, group) for j, group in enumerate(group_turns(qids)))

    def row(key: tuple[str, int, tuple[str, ...]]) -> dict[str, Any]:
        image_id, j, group = key
        ts = [turns[q] for q in group]
        return {
            "dialogue_id": f"{SOURCE}-{image_id}-{j}",
            "source": SOURCE,
            "image_id": image_id,
            "questions": [t.question for t in ts],
            "answers": [t.answer for t in ts],
            "answer_sets": [[t.answer] for t in ts],
            "question_types": [t.type for t in ts],
            "targets": [t.target for t in ts],
            "qids": list(group),
        }

    return LazyRows(keys, row)


def count_dialogues(questions_path: str | os.PathLike) -> int:
    """How many dialogues a question file gives (no image is read)."""
    return len(plan(iter_questions(questions_path), where=str(questions_path)))


def build(
    questions_path: str | os.PathLike,
    images: str | os.PathLike,
    *,
    max_dialogues: int | None = None,
    seed: int = 0,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Builds MT-GQA dialogues.

    Args:
        questions_path: a GQA questions JSON file, or a saved dataset of question rows.
        images: a folder of ``<imageId>.jpg``, or a saved dataset with ``id`` and ``image``.
        max_dialogues: keep a seeded random subset of this many dialogues (None: all).
        seed: the subset's seed.
        verify_images: decode every image once (fails on corrupt files before writing).
        cache_dir: ``datasets`` cache folder for the Arrow shards.

    Returns:
        The dialogues in canonical order (image id, then dialogue index), validated.

    Raises:
        ValueError: naming the file and the question id of a bad record, or the image file
            and the question ids of an unreadable image.
    """
    where = str(questions_path)
    plans = plan(iter_questions(questions_path), where=where)
    keep = take_subset(len(plans), max_dialogues, seed, where=where)
    plans = plans.take(keep)
    source = ImageSource(images, filename=lambda image_id: f"{image_id}.jpg")
    parts = [SOURCE, _VERSION, max_dialogues, seed, str(Path(questions_path).resolve())]
    return build_from_plans(
        plans,
        source,
        fingerprint_parts=parts,
        verify_images=verify_images,
        cache_dir=cache_dir,
        where=where,
    )
