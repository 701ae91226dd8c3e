"""MT-GQA and MT-VQA-v2 builders on tiny fixtures in the real file schemas.

Fixture counts by hand (tests/fixtures/gqa/make_fixtures.py writes them):
  GQA:   n100 has 7 questions, n200 has 3, n300 has 2      -> 2 + 1 + 0 = 3 dialogues.
  VQAv2: image 42 has 6, 73 has 4, 9 has 2, 5 has 3        -> 2 + 1 + 0 + 1 = 4 dialogues.
"""

import json
import shutil
from pathlib import Path

import datasets
import pytest

from mc_core.data import gqa, schema, vqav2

FIX = Path(__file__).parent / "fixtures"
GQA_Q = FIX / "gqa" / "testdev_balanced_questions.json"
GQA_IMG = FIX / "gqa" / "images"
VQA_Q = FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_A = FIX / "vqav2" / "v2_mscoco_val2014_annotations.json"
VQA_IMG = FIX / "vqav2" / "images"


def _close(pixel, colour):
    # JPEG (quality 50) of a flat 8x8 colour drifts by a few levels per channel; 12 is far
    # below the >= 170 gap between the fixture colours, so a wrong image still fails.
    return all(abs(p - c) <= 12 for p, c in zip(pixel, colour, strict=True))


def _gqa(tmp_path, questions=GQA_Q, images=GQA_IMG, **kw):
    return gqa.build(questions, images, cache_dir=tmp_path / "cache", **kw)


def _vqa(tmp_path, questions=VQA_Q, annotations=VQA_A, images=VQA_IMG, **kw):
    return vqav2.build(questions, annotations, images, cache_dir=tmp_path / "cache", **kw)


# ------------------------------------------------------------------------------------ GQA


def test_gqa_groups_each_image_into_three_turn_dialogues(tmp_path):
    ds = _gqa(tmp_path)
    assert len(ds) == 3 == gqa.count_dialogues(GQA_Q)
    assert ds["dialogue_id"][:] == ["gqa-n100-0", "gqa-n100-1", "gqa-n200-0"]
    first, second, third = ds[0], ds[1], ds[2]
    # Numeric id order: 999 < 1000 < 1001 (string order would put "999" last).
    assert first["questions"] == ["What colour is the cup?", "Is the cup red?", "Is there a dog?"]
    assert first["answers"] == ["red", "yes", "no"]
    assert first["answer_sets"] == [["red"], ["yes"], ["no"]]
    assert first["question_types"] == ["query", "verify", "verify"]
    assert first["targets"] == ["501", "501", ""]
    # Questions 1002-1004 form the second dialogue; 1005 (the 7th) is dropped.
    assert second["answers"] == ["plate", "cup", "no"]
    assert second["targets"] == ["501,502", "503", "501"]
    assert third["image_id"] == "n200" and third["answers"] == ["cat", "yes", "sofa"]
    assert _close(first["image"].getpixel((4, 4)), (200, 30, 30))
    assert _close(third["image"].getpixel((4, 4)), (30, 200, 30))
    assert set(ds["source"]) == {"gqa"}


def test_gqa_train_subset_is_seeded_and_canonically_ordered(tmp_path):
    full = _gqa(tmp_path)["dialogue_id"][:]
    a = _gqa(tmp_path, max_dialogues=2, seed=1)["dialogue_id"][:]
    assert a == _gqa(tmp_path, max_dialogues=2, seed=1)["dialogue_id"][:]
    assert len(a) == 2 and set(a) < set(full)
    assert a == [d for d in full if d in a]  # canonical order kept
    # 3 possible pairs: ten seeds must not all draw the same one.
    pairs = {tuple(_gqa(tmp_path, max_dialogues=2, seed=s)["dialogue_id"][:]) for s in range(10)}
    assert len(pairs) > 1
    assert _gqa(tmp_path, max_dialogues=50)["dialogue_id"][:] == full
    with pytest.raises(ValueError, match="max_dialogues must be a positive integer, got 0"):
        _gqa(tmp_path, max_dialogues=0)


def test_gqa_reads_saved_datasets(tmp_path):
    # The same questions and images as `datasets` folders (hub-style id/image columns).
    recs = json.loads(GQA_Q.read_text())
    qdir, idir = tmp_path / "q", tmp_path / "i"
    datasets.Dataset.from_list([{"id": k, **v} for k, v in recs.items()]).save_to_disk(qdir)
    images = [{"id": p.stem, "image": str(p)} for p in sorted(GQA_IMG.glob("*.jpg"))]
    datasets.Dataset.from_list(images).cast_column("image", datasets.Image()).save_to_disk(idir)
    got, ref = _gqa(tmp_path, questions=qdir, images=idir), _gqa(tmp_path)
    for col in ("dialogue_id", "questions", "answers", "question_types", "targets"):
        assert got[col][:] == ref[col][:], col
    assert _close(got[2]["image"].getpixel((0, 0)), (30, 200, 30))


def test_gqa_missing_field_names_file_and_question(tmp_path):
    bad = FIX / "gqa" / "questions_missing_answer.json"
    with pytest.raises(
        ValueError,
        match=r"questions_missing_answer\.json: question '2002': "
        r"missing field 'answer'",
    ):
        _gqa(tmp_path, questions=bad)
    recs = json.loads(GQA_Q.read_text())
    del recs["3001"]["types"]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"q\.json: question '3001': missing field 'types'"):
        _gqa(tmp_path, questions=path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"q\.json: expected a JSON object"):
        _gqa(tmp_path, questions=path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_gqa_unreadable_image_names_file_and_questions(tmp_path, damage):
    images = tmp_path / "images"
    shutil.copytree(GQA_IMG, images)
    target = images / "n200.jpg"
    if damage == "garbage":
        target.write_bytes(b"not a jpeg at all")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    else:
        target.unlink()
    with pytest.raises(ValueError, match=r"n200\.jpg: .*questions \['2001', '2002', '2003'\]"):
        _gqa(tmp_path, images=images)
    # The unused image of n300 (fewer than 3 questions) is never needed, so breaking it is fine.
    shutil.copy(GQA_IMG / "n200.jpg", target)
    (images / "n300.jpg").write_bytes(b"junk")
    assert len(_gqa(tmp_path, images=images)) == 3


def test_gqa_rebuild_sees_changed_images(tmp_path):
    # The datasets cache is keyed by file stats: a replaced image must not come from cache.
    images = tmp_path / "images"
    shutil.copytree(GQA_IMG, images)
    assert _close(_gqa(tmp_path, images=images)[2]["image"].getpixel((0, 0)), (30, 200, 30))
    shutil.copy(GQA_IMG / "n300.jpg", images / "n200.jpg")
    assert _close(_gqa(tmp_path, images=images)[2]["image"].getpixel((0, 0)), (30, 30, 200))


# ---------------------------------------------------------------------------------- VQAv2


def test_vqav2_groups_and_keeps_ten_answers(tmp_path):
    ds = _vqa(tmp_path)
    assert ds["dialogue_id"][:] == ["vqav2-5-0", "vqav2-42-0", "vqav2-42-1", "vqav2-73-0"]
    assert ds["image_id"][:] == ["5", "42", "42", "73"]
    d42 = ds[1]
    assert d42["questions"] == [f"Question {k} about image 42?" for k in range(3)]
    assert ds[2]["questions"] == [f"Question {k} about image 42?" for k in range(3, 6)]
    assert d42["answers"] == ["2"] * 3
    assert d42["answer_sets"][0] == ["2"] * 7 + ["two", "3", "4"]
    assert all(len(s) == 10 for row in ds["answer_sets"] for s in row)
    assert ds[3]["question_types"] == ["yes/no"] * 3
    assert ds[0]["targets"] == ["", "", ""]
    assert _close(ds[0]["image"].getpixel((4, 4)), (90, 90, 90))
    assert _close(d42["image"].getpixel((4, 4)), (250, 250, 0))
    out = schema.save(ds, tmp_path / "mt-vqa")
    assert schema.load(out)["dialogue_id"][:] == ds["dialogue_id"][:]


def test_vqav2_split_from_argument_or_file(tmp_path):
    q = json.loads(VQA_Q.read_text())
    del q["data_subtype"]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(q))
    with pytest.raises(ValueError, match=r"q\.json: no 'data_subtype'.*split="):
        _vqa(tmp_path, questions=path)
    assert len(_vqa(tmp_path, questions=path, split="val2014")) == 4
    with pytest.raises(ValueError, match=r"COCO_train2014_000000000005\.jpg: cannot read image"):
        _vqa(tmp_path, split="train2014")


def _write(tmp_path, name, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_vqav2_bad_annotations_name_file_and_row(tmp_path):
    bad = FIX / "vqav2" / "annotations_missing_answer.json"
    with pytest.raises(
        ValueError,
        match=r"annotations_missing_answer\.json: row 3 "
        r"\(question_id=73000\): missing field "
        r"'multiple_choice_answer'",
    ):
        _vqa(tmp_path, annotations=bad)
    a = json.loads(VQA_A.read_text())
    a["annotations"][5]["answers"].pop()
    qid = a["annotations"][5]["question_id"]
    with pytest.raises(
        ValueError,
        match=rf"a\.json: row 5 \(question_id={qid}\): expected 10 "
        r"answers, got 9",
    ):
        _vqa(tmp_path, annotations=_write(tmp_path, "a.json", a))
    a = json.loads(VQA_A.read_text())
    a["annotations"][2]["image_id"] = 999
    with pytest.raises(ValueError, match=r"a2\.json: row 2 .*image_id 999 but the question"):
        _vqa(tmp_path, annotations=_write(tmp_path, "a2.json", a))
    a = json.loads(VQA_A.read_text())
    gone = a["annotations"].pop(0)["question_id"]
    with pytest.raises(ValueError, match=rf"row 0 \(question_id={gone}\): no annotation"):
        _vqa(tmp_path, annotations=_write(tmp_path, "a3.json", a))


def test_vqav2_bad_question_row_and_image(tmp_path):
    q = json.loads(VQA_Q.read_text())
    q["questions"][4]["question"] = ""
    with pytest.raises(
        ValueError,
        match=r"q\.json: row 4 \(question_id=\d+\): bad value '' "
        r"for field 'question'",
    ):
        _vqa(tmp_path, questions=_write(tmp_path, "q.json", q))
    images = tmp_path / "images"
    shutil.copytree(VQA_IMG, images)
    (images / "COCO_val2014_000000000073.jpg").write_bytes(b"\xff\xd8broken")
    with pytest.raises(
        ValueError,
        match=r"COCO_val2014_000000000073\.jpg: unreadable image "
        r"needed by questions \['73000', '73001', '73002'\]",
    ):
        _vqa(tmp_path, images=images)


# ------------------------------------------------------------------------------------ CLI


def test_cli_writes_loadable_datasets_and_reports_errors(tmp_path, capsys):
    from mc_core.data import build

    out = tmp_path / "mt-gqa"
    rc = build.main(
        [
            "--source",
            "gqa",
            "--questions",
            str(GQA_Q),
            "--images",
            str(GQA_IMG),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 0 and "wrote 3 gqa dialogues" in capsys.readouterr().out
    assert len(schema.load(out)) == 3
    assert (
        build.main(
            ["--source", "vqav2", "--questions", str(VQA_Q), "--annotations", str(VQA_A), "--count"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "4"
    bad = FIX / "vqav2" / "annotations_missing_answer.json"
    rc = build.main(
        [
            "--source",
            "vqav2",
            "--questions",
            str(VQA_Q),
            "--annotations",
            str(bad),
            "--images",
            str(VQA_IMG),
            "--out",
            str(tmp_path / "v"),
        ]
    )
    assert rc == 2 and "row 3 (question_id=73000)" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
