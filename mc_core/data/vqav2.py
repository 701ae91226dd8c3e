"""MT-VQA-v2: multi-turn dialogues built from the VQAv2 question and annotation files.

Inputs, in the VQAv2 release schema:

- questions JSON (e.g. ``v2_OpenEnded_mscoco_val2014_questions.json``):
  ``{"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}]}``;
- annotations JSON (e.g. ``v2_mscoco_val2014_annotations.json``):
  ``{"annotations": [{"question_id", "image_id", "answers": [{"answer", "answer_confidence",
  "answer_id"} x 10], "multiple_choice_answer", "answer_type", "question_type"}]}``;
- images: a folder of COCO files ``COCO_<split>_<12-digit image id>.jpg`` (``split`` from the
  questions' ``data_subtype`` unless given), or a saved dataset with ``image_id``/``id`` and
  ``image`` columns.

Grouping rule (as MT-GQA, :mod:`mc_core.data.gqa`): each image's questions, sorted by
question id, are cut into consecutive groups of three and the remainder (``k mod 3``) is
dropped; ``sum_images floor(k_i / 3)`` dialogues. Images in id order.

Row fields: ``answers`` = ``multiple_choice_answer``; ``answer_sets`` = the ten human answers
(VQA soft accuracy, :func:`mc_core.data.accuracy.vqa_soft_accuracy`); ``question_types`` =
``answer_type`` (yes/no, number, other); ``targets`` = ``""`` (VQAv2 has no region labels).

Memory: both files are read one record at a time (:mod:`mc_core.data.jsonstream`; train2014's
annotations are ~330 MB of JSON, several GB as Python objects); per question only what a row
uses is kept, and dialogues stay compact keys until written (as MT-GQA).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from mc_core.data.assemble import (
    ImageSource,
    LazyRows,
    build_from_plans,
    group_turns,
    take_subset,
)
from mc_core.data.jsonstream import iter_object
from mc_core.data.schema import VQA_ANSWERS

SOURCE = "vqav2"
# Bump when the row layout, the grouping or the image handling changes (keys the datasets
# cache); 2: non-RGB images stored as RGB.
_VERSION = 2


def _elements(path: Path, key: str, rest: dict[str, Any]) -> Iterator[Any]:
    """The elements of the list ``key`` of the JSON object in ``path``, one at a time; the
    object's other members go to ``rest``.

    Raises:
        ValueError: naming the file when it is unreadable, malformed, or has no list ``key``.
    """
    found = False
    for name, value in iter_object(path, stream=key):
        if name == key:
            found = True
            yield from value
        else:
            rest[name] = value
    if not found:
        raise ValueError(f"{path}: expected a JSON object with a list {key!r}")


def _field(rec: Any, key: str, kind: type, *, where: Path, index: int) -> Any:
    """``rec[key]`` checked to be a non-empty ``kind``; ValueError naming file and row."""
    qid = rec.get("question_id") if isinstance(rec, dict) else None
    row = f"row {index}" + (f" (question_id={qid!r})" if qid is not None else "")
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: {row}: expected an object, got {type(rec).__name__}")
    if key not in rec:
        raise ValueError(f"{where}: {row}: missing field {key!r}")
    value = rec[key]
    bad = (
        not isinstance(value, kind)
        or isinstance(value, bool)
        or (isinstance(value, str) and not value.strip())
    )
    if bad:
        raise ValueError(
            f"{where}: {row}: bad value {value!r} for field {key!r} "
            f"(expected {'a non-empty ' if kind is str else ''}{kind.__name__})"
        )
    return value.strip() if isinstance(value, str) else value


class _Answer(NamedTuple):
    """What a row uses of one annotation, and where it was (the record is ~0.7 KB of JSON)."""

    index: int
    image_id: int
    answer: str
    answers: tuple[str, ...]
    type: str


def _annotations(apath: Path) -> dict[int, _Answer]:
    """The checked annotations by question id, read one at a time."""
    ann: dict[int, _Answer] = {}
    shared: dict[str, str] = {}  # answers repeat ("yes", "2"): one string each
    for i, rec in enumerate(_elements(apath, "annotations", {})):
        qid = _field(rec, "question_id", int, where=apath, index=i)
        image_id = _field(rec, "image_id", int, where=apath, index=i)
        answer = _field(rec, "multiple_choice_answer", str, where=apath, index=i)
        kind = _field(rec, "answer_type", str, where=apath, index=i)
        answers = _field(rec, "answers", list, where=apath, index=i)
        if len(answers) != VQA_ANSWERS:
            raise ValueError(
                f"{apath}: row {i} (question_id={qid}): expected "
                f"{VQA_ANSWERS} answers, got {len(answers)}"
            )
        for k, a in enumerate(answers):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise ValueError(
                    f"{apath}: row {i} (question_id={qid}): answers[{k}] has no "
                    f"'answer' string: {a!r}"
                )
        ann[qid] = _Answer(
            i,
            image_id,
            shared.setdefault(answer, answer),
            tuple(shared.setdefault(a["answer"], a["answer"]) for a in answers),
            shared.setdefault(kind, kind),
        )
    return ann


def plan(
    questions_path: str | os.PathLike, annotations_path: str | os.PathLike
) -> tuple[LazyRows, str | None]:
    """The dialogues (rows without images, plus ``qids``; built on access) and the questions'
    ``data_subtype``.

    Raises:
        ValueError: naming the file and the row (index, question id) of a bad record, a
            question without annotation, or an annotation whose image disagrees.
    """
    qpath, apath = Path(questions_path), Path(annotations_path)
    ann = _annotations(apath)
    qdata: dict[str, Any] = {}
    by_image: dict[int, list[int]] = defaultdict(list)
    texts: dict[int, str] = {}
    for i, rec in enumerate(_elements(qpath, "questions", qdata)):
        qid = _field(rec, "question_id", int, where=qpath, index=i)
        image_id = _field(rec, "image_id", int, where=qpath, index=i)
        texts[qid] = _field(rec, "question", str, where=qpath, index=i)
        if qid not in ann:
            raise ValueError(
                f"{qpath}: row {i} (question_id={qid}): no annotation for it in {apath}"
            )
        a = ann[qid]
        if a.image_id != image_id:
            raise ValueError(
                f"{apath}: row {a.index} (question_id={qid}): image_id {a.image_id} "
                f"but the question (row {i} of {qpath}) has {image_id}"
            )
        by_image[image_id].append(qid)

    keys = []
    for image_id in sorted(by_image):
        for j, group in enumerate(group_turns(sorted(by_image.pop(image_id)))):
            keys.append((image_id, j, group))

    def row(key: tuple[int, int, tuple[int, ...]]) -> dict[str, Any]:
        image_id, j, group = key
        recs = [ann[q] for q in group]
        return {
            "dialogue_id": f"{SOURCE}-{image_id}-{j}",
            "source": SOURCE,
            "image_id": str(image_id),
            "questions": [texts[q] for q in group],
            "answers": [r.answer for r in recs],
            "answer_sets": [list(r.answers) for r in recs],
            "question_types": [r.type for r in recs],
            "targets": [""] * len(group),
            "qids": [str(q) for q in group],
        }

    subtype = qdata.get("data_subtype")
    return LazyRows(keys, row), subtype if isinstance(subtype, str) and subtype else None


def image_filename(image_id: str, split: str) -> str:
    """COCO file name, e.g. ``COCO_val2014_000000000042.jpg``."""
    return f"COCO_{split}_{int(image_id):012d}.jpg"


def build(
    questions_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    images: str | os.PathLike,
    *,
    split: str | None = None,
    max_dialogues: int | None = None,
    seed: int = 0,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Builds MT-VQA-v2 dialogues.

    Args:
        questions_path: VQAv2 questions JSON.
        annotations_path: VQAv2 annotations JSON of the same split.
        images: folder of COCO images, or a saved dataset with ``image_id``/``id`` + ``image``.
        split: COCO split in the file names (default: the questions' ``data_subtype``).
        max_dialogues: keep a seeded random subset of this many dialogues (None: all).
        seed: the subset's seed.
        verify_images: decode every image once (fails on corrupt files before writing).
        cache_dir: ``datasets`` cache folder for the Arrow shards.

    Returns:
        The dialogues in canonical order (image id, then dialogue index), validated.

    Raises:
        ValueError: naming the file and row of a bad record, or the image file and the
            question ids of an unreadable image.
    """
    where = str(questions_path)
    plans, subtype = plan(questions_path, annotations_path)
    split = split or subtype
    if not split:
        raise ValueError(
            f"{questions_path}: no 'data_subtype' in the questions file; pass "
            f"split= (e.g. 'val2014') to name the COCO image files"
        )
    keep = take_subset(len(plans), max_dialogues, seed, where=where)
    plans = plans.take(keep)
    source = ImageSource(images, filename=lambda image_id: image_filename(image_id, split))
    parts = [
        SOURCE,
        _VERSION,
        split,
        max_dialogues,
        seed,
        str(Path(questions_path).resolve()),
        str(Path(annotations_path).resolve()),
    ]
    return build_from_plans(
        plans,
        source,
        fingerprint_parts=parts,
        verify_images=verify_images,
        cache_dir=cache_dir,
        where=where,
    )
