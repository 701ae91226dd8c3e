"""The dialogue schema: validation of good and broken rows, atomic save, load."""

import io

import datasets
import pytest
from PIL import Image

from mc_core.data import assemble, schema


def _png(colour=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: int, source: str = "synthetic") -> dict:
    answers = ["red", "2", "yes"]
    sets = [[a] * 10 for a in answers] if source == "vqav2" else [[a] for a in answers]
    return {
        "dialogue_id": f"d{i}",
        "source": source,
        "image_id": f"img{i}",
        "image": {"bytes": _png((i, 0, 0)), "path": None},
        "questions": ["What colour is the top-left object?", "How many squares?", "Any star?"],
        "answers": answers,
        "answer_sets": sets,
        "question_types": ["colour", "count", "exist"],
        "targets": ["r0c0", "square", ""],
    }


def _ds(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=schema.FEATURES)


def test_good_rows_validate_and_round_trip(tmp_path):
    ds = _ds([_row(0), _row(1, "gqa"), _row(2, "vqav2")])
    assert schema.validate(ds, where="mem") is ds
    out = schema.save(ds, tmp_path / "d")
    back = schema.load(out)
    assert back.features == schema.FEATURES
    assert back["dialogue_id"][:] == ["d0", "d1", "d2"]
    assert back[2]["answer_sets"][0] == ["red"] * 10
    # Image bytes are embedded: the PNG decodes to the colour written.
    assert back[1]["image"].getpixel((0, 0)) == (1, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folder left behind


def _set(row: dict, col: str, value) -> dict:
    row = dict(row)
    row[col] = value
    return row


BROKEN = [
    # (column, replacement, words the message must contain)
    ("questions", ["only", "two"], "list of 3"),
    ("questions", ["a", "", "c"], "turn 1: empty"),
    ("answers", ["a", "b", "c", "d"], "list of 3"),
    ("source", "coco", "'coco' is not one of"),
    ("image_id", "", "non-empty string"),
    ("image", None, "no image"),
    ("question_types", ["colour", " ", "exist"], "turn 1: empty"),
    ("targets", ["", ""], "list of 3"),
    ("answer_sets", [["red"], ["2"]], "3 lists"),
    ("answer_sets", [["red"], ["3"], ["yes"]], "turn 1: expected [answer]"),
]


@pytest.mark.parametrize(("column", "value", "words"), BROKEN)
def test_broken_row_names_where_row_and_column(column, value, words):
    ds = _ds([_row(0), _set(_row(1), column, value), _row(2)])
    with pytest.raises(ValueError) as err:
        schema.validate(ds, where="data/x")
    msg = str(err.value)
    assert msg.startswith("data/x: row 1 (dialogue_id='d1')"), msg
    assert f"column {column!r}" in msg
    assert words in msg


def test_vqav2_needs_ten_answers():
    row = _row(3, "vqav2")
    row["answer_sets"] = [["red"] * 10, ["2"] * 9, ["yes"] * 10]
    with pytest.raises(ValueError, match=r"row 0 .*'answer_sets'.*turn 1.*10 human answers, got 9"):
        schema.validate(_ds([row]), where="v")


def test_duplicate_ids_missing_columns_and_wrong_types():
    with pytest.raises(ValueError, match=r"row 2.*duplicate dialogue_id 'd0' \(first at row 0\)"):
        schema.validate(_ds([_row(0), _row(1), _row(0)]), where="w")
    with pytest.raises(ValueError, match=r"w: .*missing \['targets'\]"):
        schema.validate(_ds([_row(0)]).remove_columns("targets"), where="w")
    ds = _ds([_row(0)]).cast_column("image", datasets.Image(decode=False))
    with pytest.raises(ValueError, match=r"column 'image': feature type"):
        schema.validate(ds, where="w")
    with pytest.raises(ValueError, match="expected a datasets.Dataset"):
        schema.validate(datasets.DatasetDict({"train": _ds([_row(0)])}), where="w")


def test_row_index_refers_to_the_view():
    # After select(), errors must quote the index in the dataset the caller holds.
    ds = _ds([_row(0), _set(_row(1), "source", "bad"), _row(2)]).select([2, 1])
    with pytest.raises(ValueError, match=r"row 1 \(dialogue_id='d1'\)"):
        schema.validate(ds, where="sel")


def test_save_refuses_invalid_and_keeps_previous(tmp_path):
    target = tmp_path / "d"
    schema.save(_ds([_row(0)]), target)
    with pytest.raises(ValueError, match="source"):
        schema.save(_ds([_set(_row(5), "source", "bad")]), target)
    assert schema.load(target)["dialogue_id"][:] == ["d0"]
    schema.save(_ds([_row(7), _row(8)]), target)  # replacing an existing dataset works
    assert schema.load(target)["dialogue_id"][:] == ["d7", "d8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        schema.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        schema.load(tmp_path / "empty")


def test_group_turns_drops_the_remainder():
    ids = [str(i) for i in range(8)]
    assert assemble.group_turns(ids) == [("0", "1", "2"), ("3", "4", "5")]
    assert assemble.group_turns(ids[:2]) == []
    assert sorted(["10", "9", "x", "100"], key=assemble.id_sort_key) == ["9", "10", "100", "x"]
