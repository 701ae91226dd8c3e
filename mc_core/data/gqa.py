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
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets

from mc_core.data.assemble import (
    ImageSource,
    build_from_plans,
    group_turns,
    id_sort_key,
    take_subset,
)
from mc_core.data.schema import is_saved_dataset

SOURCE = "gqa"
# Bump when the row layout, the grouping or the image handling changes (keys the datasets
# cache); 2: non-RGB images stored as RGB.
_VERSION = 2


def read_questions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The question records by question id, from a GQA JSON file or a saved dataset folder.

    Raises:
        ValueError: naming the file when it is unreadable or not in the GQA schema.
    """
    path = Path(path)
    if is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if not isinstance(ds, datasets.Dataset) or "id" not in ds.column_names:
            raise ValueError(
                f"{path}: expected one dataset of GQA questions with an 'id' "
                f"column, got {type(ds).__name__} "
                f"{getattr(ds, 'column_names', None)}"
            )
        return {str(r["id"]): r for r in ds}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read GQA questions: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object {{question_id: question}}, got {type(data).__name__}"
        )
    return data


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


def plan(questions: dict[str, dict[str, Any]], *, where: str) -> list[dict[str, Any]]:
    """The dialogues (rows without images, plus ``qids``) in canonical order.

    Raises:
        ValueError: naming ``where`` and the question id of a record with a missing field.
    """
    by_image: dict[str, list[str]] = defaultdict(list)
    parsed: dict[str, dict[str, str]] = {}
    for qid, rec in questions.items():
        qid = str(qid)
        if not isinstance(rec, dict):
            raise ValueError(
                f"{where}: question {qid!r}: expected an object, got {type(rec).__name__}"
            )
        types = rec.get("types")
        if not isinstance(types, dict):
            raise ValueError(f"{where}: question {qid!r}: missing field 'types'")
        parsed[qid] = {
            "image_id": _text(rec, "imageId", where=where, qid=qid),
            "question": _text(rec, "question", where=where, qid=qid),
            "answer": _text(rec, "answer", where=where, qid=qid),
            "type": _text(types, "structural", where=where, qid=f"{qid}'s types"),
            "target": _targets(rec),
        }
        by_image[parsed[qid]["image_id"]].append(qid)
    plans = []
    for image_id in sorted(by_image, key=id_sort_key):
        qids = sorted(by_image[image_id], key=id_sort_key)
        for j, group in enumerate(group_turns(qids)):
            turns = [parsed[q] for q in group]
            plans.append(
                {
                    "dialogue_id": f"{SOURCE}-{image_id}-{j}",
                    "source": SOURCE,
                    "image_id": image_id,
                    "questions": [t["question"] for t in turns],
                    "answers": [t["answer"] for t in turns],
                    "answer_sets": [[t["answer"]] for t in turns],
                    "question_types": [t["type"] for t in turns],
                    "targets": [t["target"] for t in turns],
                    "qids": list(group),
                }
            )
    return plans


def count_dialogues(questions_path: str | os.PathLike) -> int:
    """How many dialogues a question file gives (no image is read)."""
    return len(plan(read_questions(questions_path), where=str(questions_path)))


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
    plans = plan(read_questions(questions_path), where=where)
    keep = take_subset(len(plans), max_dialogues, seed, where=where)
    plans = [plans[i] for i in keep]
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
