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
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets

from mc_core.data.assemble import ImageSource, build_from_plans, group_turns, take_subset
from mc_core.data.schema import VQA_ANSWERS

SOURCE = "vqav2"
# Bump when the row layout, the grouping or the image handling changes (keys the datasets
# cache); 2: non-RGB images stored as RGB.
_VERSION = 2


def _read_json(path: Path, key: str) -> tuple[dict[str, Any], list[Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read VQAv2 {key}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a list {key!r}")
    return data, data[key]


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


def plan(
    questions_path: str | os.PathLike, annotations_path: str | os.PathLike
) -> tuple[list[dict[str, Any]], str | None]:
    """The dialogues (rows without images, plus ``qids``) and the questions' ``data_subtype``.

    Raises:
        ValueError: naming the file and the row (index, question id) of a bad record, a
            question without annotation, or an annotation whose image disagrees.
    """
    qpath, apath = Path(questions_path), Path(annotations_path)
    qdata, qrecs = _read_json(qpath, "questions")
    _, arecs = _read_json(apath, "annotations")
    ann: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, rec in enumerate(arecs):
        qid = _field(rec, "question_id", int, where=apath, index=i)
        _field(rec, "image_id", int, where=apath, index=i)
        _field(rec, "multiple_choice_answer", str, where=apath, index=i)
        _field(rec, "answer_type", str, where=apath, index=i)
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
        ann[qid] = (i, rec)

    by_image: dict[int, list[int]] = defaultdict(list)
    texts: dict[int, str] = {}
    for i, rec in enumerate(qrecs):
        qid = _field(rec, "question_id", int, where=qpath, index=i)
        image_id = _field(rec, "image_id", int, where=qpath, index=i)
        texts[qid] = _field(rec, "question", str, where=qpath, index=i)
        if qid not in ann:
            raise ValueError(
                f"{qpath}: row {i} (question_id={qid}): no annotation for it in {apath}"
            )
        j, a = ann[qid]
        if a["image_id"] != image_id:
            raise ValueError(
                f"{apath}: row {j} (question_id={qid}): image_id {a['image_id']} "
                f"but the question (row {i} of {qpath}) has {image_id}"
            )
        by_image[image_id].append(qid)

    plans = []
    for image_id in sorted(by_image):
        for j, group in enumerate(group_turns(sorted(by_image[image_id]))):
            recs = [ann[q][1] for q in group]
            plans.append(
                {
                    "dialogue_id": f"{SOURCE}-{image_id}-{j}",
                    "source": SOURCE,
                    "image_id": str(image_id),
                    "questions": [texts[q] for q in group],
                    "answers": [r["multiple_choice_answer"].strip() for r in recs],
                    "answer_sets": [[a["answer"] for a in r["answers"]] for r in recs],
                    "question_types": [r["answer_type"].strip() for r in recs],
                    "targets": [""] * len(group),
                    "qids": [str(q) for q in group],
                }
            )
    subtype = qdata.get("data_subtype")
    return plans, subtype if isinstance(subtype, str) and subtype else None


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
    plans = [plans[i] for i in keep]
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
