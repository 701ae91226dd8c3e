"""``source: dataset``: your own dialogues from a save_to_disk folder, checked before any write.

Also the one image conversion (``mc_core.data.images``): every mode to RGB, sizes the
processors take, and images of odd modes and sizes through each family's tiny model.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image

from mc_core.data import dataset, gqa, images, schema
from mc_core.inference.dialogue import encode_dialogue

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # Builders write Arrow shards to the datasets cache: keep them in the test's folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    if image.mode in ("CMYK", "F", "YCbCr") and fmt == "PNG":
        fmt = "TIFF"  # PNG has no such modes; TIFF keeps them losslessly
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _row(i: int, picture: Image.Image | bytes | None = None, **changes) -> dict:
    if picture is None:
        picture = Image.new("RGB", (6, 4), (i, 100, 200))
    data = picture if isinstance(picture, bytes) else _encode(picture)
    row = {
        "dialogue_id": f"mine-{i}",
        "source": "dataset",
        "image_id": f"img-{i // 2}",
        "image": {"bytes": data, "path": None},
        "questions": [f"What is in picture {i}?", "What colour is it?", "How many?"],
        "answers": ["a cat", "red", "2"],
        "answer_sets": [["a cat"], ["red", "dark red", "red"], ["2"]],
        "question_types": ["object", "colour", "count"],
        "targets": ["", "cat", ""],
    }
    row.update(changes)
    return row


def _save(folder: Path, rows: list[dict], features=schema.FEATURES) -> Path:
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return folder


def _build(folder: Path, **kw) -> datasets.Dataset:
    return dataset.build(folder, **kw)


# ------------------------------------------------------------------- round trip and subsets


def _params(tmp_path: Path, train: dict, test: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] = {"train": train, "val": None, "test": test}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _prepare(tmp_path, monkeypatch, train: dict, test: dict) -> None:
    from tasks import prepare

    monkeypatch.setenv("MC_PARAMS", str(_params(tmp_path, train, test)))
    monkeypatch.chdir(tmp_path)
    prepare.main()


def test_round_trip_from_save_to_disk_through_prepare(tmp_path, monkeypatch):
    rgba = Image.new("RGBA", (5, 5), (255, 0, 0, 0))  # fully transparent: becomes white
    rows = [_row(i) for i in range(5)]
    rows[3] = _row(3, rgba)
    folder = _save(tmp_path / "mine", rows)
    train = {"source": "dataset", "path": str(folder), "dialogues": None, "seed": 0}
    test = {"source": "dataset", "path": str(folder), "dialogues": 2, "seed": 1}
    _prepare(tmp_path, monkeypatch, train, test)

    got = schema.load(tmp_path / "data" / "train")
    for col in ("dialogue_id", "source", "image_id", "questions", "answers", "answer_sets"):
        assert got[col][:] == [r[col] for r in rows], col
    assert got[0]["image"].getpixel((0, 0)) == (0, 100, 200)  # RGB PNG kept byte for byte
    assert got[3]["image"].mode == "RGB" and got[3]["image"].getpixel((2, 2)) == (255, 255, 255)
    assert len(schema.load(tmp_path / "data" / "test")) == 2
    assert not any((tmp_path / "data" / "val").iterdir())
    counts = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert counts["train"] == {"source": "dataset", "dialogues": 5, "images": 3}
    assert counts["test"]["dialogues"] == 2 and counts["val"] is None
    # The folder written by schema.save (prepare's own output) is a valid input too.
    assert _build(tmp_path / "data" / "train")["dialogue_id"][:] == got["dialogue_id"][:]


def test_a_bad_folder_stops_prepare_before_anything_is_written(tmp_path, monkeypatch):
    good = _save(tmp_path / "good", [_row(i) for i in range(3)])
    bad = _save(tmp_path / "bad", [_row(0), _row(1, answers=["x", "y"])])
    train = {"source": "dataset", "path": str(good)}
    test = {"source": "dataset", "path": str(bad)}
    with pytest.raises(ValueError, match=r"bad: row 1 .*'answers': 2 answers for 3 questions"):
        _prepare(tmp_path, monkeypatch, train, test)
    # Every split is checked before any is written: not even the good train split is there.
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_subset_is_seeded_and_keeps_folder_order(tmp_path):
    folder = _save(tmp_path / "mine", [_row(i) for i in range(8)])
    full = _build(folder)["dialogue_id"][:]
    a = _build(folder, max_dialogues=3, seed=4)["dialogue_id"][:]
    assert a == _build(folder, max_dialogues=3, seed=4)["dialogue_id"][:]
    assert len(a) == 3 and a == [d for d in full if d in a]
    draws = {tuple(_build(folder, max_dialogues=3, seed=s)["dialogue_id"][:]) for s in range(6)}
    assert len(draws) > 1
    assert _build(folder, max_dialogues=50)["dialogue_id"][:] == full
    with pytest.raises(ValueError, match="max_dialogues must be a positive integer, got 0"):
        _build(folder, max_dialogues=0)


def test_wide_string_and_list_types_and_object_centres_are_accepted(tmp_path):
    s = datasets.Value("large_string")
    features = datasets.Features(
        {
            **schema.FEATURES,
            "questions": datasets.LargeList(s),
            "dialogue_id": s,
            "answer_sets": datasets.List(datasets.LargeList(s)),
            "object_centres": datasets.List(datasets.List(datasets.Value("float64"))),
        }
    )
    rows = [_row(i, object_centres=[[0.5, 0.25]]) for i in range(2)]
    got = _build(_save(tmp_path / "wide", rows, features))
    assert got.features == datasets.Features({**schema.FEATURES, **schema.OPTIONAL_FEATURES})
    assert got["object_centres"][:] == [[[0.5, 0.25]]] * 2


# ---------------------------------------------------------------------------- row errors

ROW_ERRORS = [
    # (column, value, words the message must contain)
    ("answers", ["x", "y"], "2 answers for 3 questions"),
    ("answer_sets", [["a"]] * 4, "4 answer sets for 3 questions"),
    ("question_types", ["object"], "1 question types for 3 questions"),
    ("targets", ["", ""], "2 targets for 3 questions"),
    ("questions", [], "expected a list of questions"),
    ("questions", ["q?", "", "q?"], "turn 1: empty string"),
    ("answers", ["a cat", "red", " "], "turn 2: empty string"),
    ("source", "coco", "'coco' is not one of"),
    ("image_id", "", "non-empty string"),
    ("dialogue_id", "mine-0", "duplicate (first at row 0)"),
    ("answer_sets", [["a dog"], ["red", "x"], ["2"]], "turn 0: expected [answer]"),
    ("answer_sets", [["a cat"], [], ["2"]], "turn 1: empty list of accepted answers"),
    ("image", None, "no image"),
    ("object_centres", [[0.5, 1.5]], "centre [0.5, 1.5] is not (row, col) in [0, 1]"),
]


@pytest.mark.parametrize(("column", "value", "words"), ROW_ERRORS)
def test_row_errors_name_the_folder_row_and_column(tmp_path, column, value, words):
    rows = [_row(0), _row(1), _row(2, **{column: value})]
    features = schema.FEATURES
    if column == "object_centres":
        rows = [{"object_centres": [], **r} for r in rows]
        features = datasets.Features({**features, **schema.OPTIONAL_FEATURES})
    folder = _save(tmp_path / "mine", rows, features)
    with pytest.raises(ValueError) as err:
        _build(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder}: row 2"), msg
    assert f"column {column!r}" in msg and words in msg, msg


def test_four_turns_are_refused_with_the_rule(tmp_path):
    four = {
        c: _row(1)[c] + _row(1)[c][:1]
        for c in ("questions", "answers", "answer_sets", "question_types", "targets")
    }
    folder = _save(tmp_path / "mine", [_row(0), _row(1, **four)])
    with pytest.raises(ValueError, match=r"mine: row 1 .*'questions': 4 turns; .*exactly 3"):
        _build(folder)


# ------------------------------------------------------------------------- folder errors


def test_folder_errors_name_the_folder_and_the_column(tmp_path):
    rows = [_row(0), _row(1)]
    with pytest.raises(ValueError, match=r"absent: no such folder"):
        _build(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: not a folder written by Dataset.save_to_disk"):
        _build(tmp_path / "plain")
    ds = datasets.Dataset.from_list(rows, features=schema.FEATURES)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"dict: holds a DatasetDict with splits \['train'\]"):
        _build(tmp_path / "dict")
    ds.remove_columns("targets").save_to_disk(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"missing: columns .*missing \['targets'\]"):
        _build(tmp_path / "missing")
    ds.add_column("note", ["x", "y"]).save_to_disk(str(tmp_path / "extra"))
    with pytest.raises(ValueError, match=r"unexpected \['note'\] \(drop them: ds.remove_columns"):
        _build(tmp_path / "extra")
    flat = [{**r, "questions": " / ".join(r["questions"])} for r in rows]
    features = datasets.Features({**schema.FEATURES, "questions": datasets.Value("string")})
    _save(tmp_path / "flat", flat, features)
    with pytest.raises(
        ValueError, match=r"flat: column 'questions': type string, expected list<string>"
    ):
        _build(tmp_path / "flat")
    raw = [{**r, "image": r["image"]["bytes"]} for r in rows]
    features = datasets.Features({**schema.FEATURES, "image": datasets.Value("binary")})
    _save(tmp_path / "binary", raw, features)
    with pytest.raises(ValueError, match=r"column 'image': type binary, .*cast_column"):
        _build(tmp_path / "binary")
    ds.select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty: the dataset has no rows"):
        _build(tmp_path / "empty")


# -------------------------------------------------------------------------- image errors


def _path_only(folder: Path, row: int, path: str) -> None:
    """Rewrites the saved Arrow shard so row ``row``'s image is a bare file path (no bytes):
    what a folder written by other tools than save_to_disk (which embeds files) may hold."""
    (shard,) = folder.glob("data-*.arrow")
    # Read into memory first: a memory map would be truncated under the table by the rewrite.
    table = pa.ipc.open_stream(pa.BufferReader(shard.read_bytes())).read_all()
    cells = table.column("image").to_pylist()
    cells[row] = {"bytes": None, "path": path}
    table = table.set_column(
        table.schema.get_field_index("image"),
        "image",
        pa.array(cells, table.schema.field("image").type),
    )
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_unreadable_or_missing_images_name_the_row_and_file(tmp_path):
    png = _encode(Image.new("RGB", (8, 8), (1, 2, 3)))
    for name, data in (("garbage", b"not an image"), ("truncated", png[: len(png) // 2])):
        folder = _save(tmp_path / name, [_row(0), _row(1, data)])
        with pytest.raises(
            ValueError, match=rf"{name}: row 1 \(dialogue_id='mine-1'\): column 'image': "
        ) as err:
            _build(folder)
        assert "unreadable image" in str(err.value)

    folder = _save(tmp_path / "linked", [_row(0), _row(1), _row(2)])
    (folder / "pics").mkdir()
    Image.new("L", (3, 3), 40).save(folder / "pics" / "grey.png")
    _path_only(folder, 1, "pics/grey.png")  # relative to the folder: found there
    _path_only(folder, 2, str(tmp_path / "gone.png"))
    with pytest.raises(
        ValueError,
        match=r"linked: row 2 .*column 'image' \(file .*gone\.png\): cannot read the image file",
    ):
        _build(folder)
    _path_only(folder, 2, "pics/grey.png")
    got = _build(folder)
    assert got[1]["image"].mode == "RGB" and got[1]["image"].getpixel((1, 1)) == (40, 40, 40)


def test_sizes_beyond_the_processors_are_rejected_with_row_and_size(tmp_path, monkeypatch):
    wide = Image.new("RGB", (6000, 20), (9, 9, 9))  # aspect 300: Qwen2-VL refuses > 200
    folder = _save(tmp_path / "wide", [_row(0), _row(1), _row(2, wide)])
    with pytest.raises(
        ValueError, match=r"row 2 .*column 'image': image of 6000 x 20 pixels has aspect ratio 300"
    ):
        _build(folder)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)  # a real bomb would take seconds to write
    big = _save(tmp_path / "big", [_row(0), _row(1, Image.new("RGB", (50, 30)))])
    with pytest.raises(ValueError, match=r"row 1 .*image of 50 x 30 pixels is larger than 1000"):
        _build(big)


# ---------------------------------------------------------------------- modes and sizes


def _grey16(values) -> Image.Image:
    return Image.fromarray(np.asarray(values, dtype=np.uint16))


MODES = [
    # (image, pixel (x, y), expected RGB)
    (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (0, 0), (255, 255, 255)),
    (Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (0, 0), (255, 127, 127)),
    (Image.new("LA", (4, 4), (0, 255)), (0, 0), (0, 0, 0)),
    (Image.new("LA", (4, 4), (0, 0)), (0, 0), (255, 255, 255)),
    (Image.new("L", (4, 4), 77), (0, 0), (77, 77, 77)),
    (Image.new("1", (4, 4), 1), (0, 0), (255, 255, 255)),
    (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (0, 0), (255, 255, 255)),
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (0, 0), (255, 0, 0)),
    (_grey16([[65535, 32896], [0, 257]]), (0, 0), (255, 255, 255)),
    (_grey16([[65535, 32896], [0, 257]]), (1, 0), (128, 128, 128)),
    (_grey16([[65535, 32896], [0, 257]]), (1, 1), (1, 1, 1)),
    (Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)), (0, 0), (128, 128, 128)),
    (Image.new("YCbCr", (4, 4), (255, 128, 128)), (0, 0), (255, 255, 255)),
]


def _palette(transparent: bool) -> Image.Image:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    if transparent:
        im.info["transparency"] = 1
    return im


@pytest.mark.parametrize(("image", "xy", "rgb"), MODES, ids=lambda v: getattr(v, "mode", None))
def test_to_rgb_of_every_mode(image, xy, rgb):
    out = images.to_rgb(image)
    assert out.mode == "RGB" and out.getpixel(xy) == rgb


def test_palette_transparency_and_16_bit_files_from_disk(tmp_path):
    assert images.to_rgb(_palette(False)).getpixel((0, 0)) == (0, 200, 0)
    assert images.to_rgb(_palette(True)).getpixel((0, 0)) == (255, 255, 255)
    # A 16-bit PNG as PIL decodes it from bytes (I;16 or I, by Pillow version).
    data = _encode(_grey16([[65535, 0]]))
    rgb = Image.open(io.BytesIO(images.rgb_bytes(data, where="x")))
    assert rgb.mode == "RGB" and [rgb.getpixel((x, 0)) for x in (0, 1)] == [(255,) * 3, (0,) * 3]
    jpeg = _encode(Image.new("RGB", (8, 8), (10, 20, 30)), "JPEG")
    assert images.rgb_bytes(jpeg, where="x") is jpeg  # RGB files are kept as they are
    with pytest.raises(ValueError, match="expected a PIL image, got ndarray"):
        images.to_rgb(np.zeros((2, 2, 3)))


ODD = {
    "rgba": Image.new("RGBA", (40, 30), (200, 10, 10, 90)),
    "palette": _palette(True).resize((17, 9)),
    "grey-1x1": Image.new("L", (1, 1), 200),
    "bits-1": Image.new("1", (9, 5), 1),
    "grey16": _grey16(np.arange(400).reshape(20, 20) * 160),
    "cmyk": Image.new("CMYK", (12, 12), (0, 200, 200, 0)),
    "rgb-1x1": Image.new("RGB", (1, 1), (0, 0, 255)),
    "wide-10000x200": Image.new("RGB", (10000, 200), (30, 60, 90)),
    "tall-3x500": Image.new("RGB", (3, 500), (30, 60, 90)),
}


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd") / "mine"
    _save(folder, [_row(i, im) for i, im in enumerate(ODD.values())])
    cache = folder.parent / "cache"
    return dataset.build(folder, cache_dir=cache)


def test_odd_images_reach_a_forward_pass_of_every_family(
    odd_dataset, tiny, each_family, one_thread
):
    model, processor = tiny(each_family)
    for i, name in enumerate(ODD):
        row = schema.row(odd_dataset, i)
        assert row["image"].mode == "RGB" and row["image"].size == ODD[name].size, name
        inputs, _ = encode_dialogue(processor, [row["image"]], row["questions"], row["answers"])
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all(), (each_family, name)


def test_the_aspect_limit_is_what_the_qwen_processor_refuses(tiny):
    _, processor = tiny("qwen2_vl")
    ok, refused = Image.new("RGB", (4000, 20)), Image.new("RGB", (4020, 20))
    images.check_size(ok.size, where="x")  # ratio 200: passes here and there
    encode_dialogue(processor, [ok], ["q?"] * 3, ["a"] * 3)
    with pytest.raises(ValueError, match="aspect ratio 201"):
        images.check_size(refused.size, where="x")
    with pytest.raises(ValueError, match="aspect ratio"):
        encode_dialogue(processor, [refused], ["q?"] * 3, ["a"] * 3)


# ---------------------------------------------------------------- builders, params, CLI


def test_gqa_builder_stores_grey_and_cmyk_images_as_rgb(tmp_path):
    pics = tmp_path / "images"
    shutil.copytree(FIX / "gqa" / "images", pics)
    Image.new("L", (8, 8), 90).save(pics / "n100.jpg", format="JPEG")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(pics / "n200.jpg", format="JPEG")
    ds = gqa.build(FIX / "gqa" / "testdev_balanced_questions.json", pics, cache_dir=tmp_path / "c")
    first, third = ds[0]["image"], ds[2]["image"]
    assert first.mode == third.mode == "RGB"
    assert all(abs(v - 90) <= 2 for v in first.getpixel((4, 4)))
    assert all(v >= 250 for v in third.getpixel((4, 4)))


def test_evaluate_converts_images_with_the_same_rule():
    from mc_core.evaluation.runner import row_images as _images

    (out,) = _images({"image": Image.new("RGBA", (2, 2), (0, 0, 0, 0))})
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_params_dataset_entries_are_checked():
    from tasks import params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def check(entry: dict) -> None:
        params.validate({**raw, "data": {**raw["data"], "train": entry}}, source="p.yaml")

    check({"source": "dataset", "path": "/data/mine", "dialogues": 10, "seed": 3})
    with pytest.raises(ValueError, match=r"p.yaml: data.train.*source 'dataset' needs \['path'\]"):
        check({"source": "dataset"})
    with pytest.raises(
        ValueError, match=r"data.train.*takes path, dialogues, seed; not \['images'"
    ):
        check({"source": "dataset", "path": "/d", "images": "/i"})
    with pytest.raises(ValueError, match=r"data.train.*path applies to source 'dataset'"):
        check({"source": "synthetic", "dialogues": 4, "path": "/d"})
    with pytest.raises(ValueError, match=r"data.train.dialogues"):
        check({"source": "dataset", "path": "/d", "dialogues": 0})


def test_cli_checks_a_folder(tmp_path, capsys):
    folder = _save(tmp_path / "mine", [_row(i) for i in range(4)])
    assert dataset.main([str(folder), "--dialogues", "2", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "2 dialogues over" in capsys.readouterr().out
    bad = _save(tmp_path / "bad", [_row(0, source="coco")])
    assert dataset.main([str(bad)]) == 2
    assert "bad: row 0" in capsys.readouterr().err
