"""Data at scale (issue 26): the streaming JSON reader, the builders on top of it, the saving
that never maps a whole dataset, and ``bench.data_scale`` end to end at a tiny size.

Memory itself is what the bench measures (bench/results/data-scale-*.json); these tests check
that streaming changes nothing a builder or a saved folder holds, and that bad files fail with
the file and the position named.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from bench import data_scale
from mc_core.data import gqa, residency, saving, schema, vqav2
from mc_core.data.jsonstream import CHUNK, iter_object

FIX = Path(__file__).parent / "fixtures"
GQA_Q = FIX / "gqa" / "testdev_balanced_questions.json"
VQA_A = FIX / "vqav2" / "v2_mscoco_val2014_annotations.json"
CHUNKS = (1, 2, 3, 7, 64, CHUNK)  # tiny windows cut every value, token and escape somewhere

# Edge cases json.load takes: nesting, braces and quotes inside strings, escapes, whitespace
# of every kind, raw and escaped unicode (a surrogate pair too), numbers of every shape,
# literals, empty containers, and a repeated name (json.load keeps the last value, first place).
EDGE = (
    ' \t\r\n{"nested": {"a": [1, [2, [3, {"b": {}}]], []], "}{": "{\\"}\\\\"},\n'
    '\t"br{ace}s": "} ] [ { , : \\"", "esc": "\\n\\t\\r\\b\\f\\/\\\\ \\u0041",\n'
    '  "unicodé": "caf\u00e9 \u6f22\u5b57 \U0001f600", "esc-pair": "\\ud83d\\ude00 \\u00e9",\n'
    '  "ints": [0, -0, 7, -12, 123456789012345678901234567890],\n'
    '  "floats": [0.5, -0.5E-10, 1e3, 2.5e+7, -1.25E-3],\n'
    '  "lits": [true, false, null], "empty": {}, "none": [], "s": "",\n'
    '  "nested": "repeated: last value wins", "n": -0.5E-10\r\n}\n\t '
)


def _write(tmp_path: Path, text: str, name: str = "doc.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The reader


@pytest.mark.parametrize("chunk", CHUNKS)
def test_iter_object_equals_json_load(tmp_path, chunk):
    edge = _write(tmp_path, EDGE)
    for path in (edge, GQA_Q):
        ref = json.loads(path.read_text(encoding="utf-8"))
        got = dict(iter_object(path, chunk=chunk))
        assert got == ref
        assert list(got) == list(ref)  # the same order, a repeated name in its first place
    assert [k for k, _ in iter_object(edge, chunk=chunk)].count("nested") == 2


@pytest.mark.parametrize("chunk", CHUNKS)
def test_streamed_array_yields_each_element(tmp_path, chunk):
    ref = json.loads(VQA_A.read_text())
    members = []
    for name, value in iter_object(VQA_A, stream="annotations", chunk=chunk):
        members.append((name, list(value) if name == "annotations" else value))
    assert dict(members) == ref
    # Elements left unread are skipped; an empty array is an empty iterator.
    path = _write(tmp_path, '{"a": [1, {"x": "]"}, 3], "b": [], "c": 2}')
    got = {k: (None if k == "a" else v) for k, v in iter_object(path, stream="a", chunk=chunk)}
    assert got == {"a": None, "b": [], "c": 2}
    assert [list(v) for k, v in iter_object(path, stream="b", chunk=chunk) if k == "b"] == [[]]


BAD = [
    ('{"a": {"b": [1, 2', "the file ends inside a value", 17),  # truncated
    ('{"a": "abc', "the file ends inside a value", 6),  # truncated in a string
    ('{"a": 1', "the file ends early", 7),
    ('{"a": 1,}', "expected a member name", 8),  # trailing comma
    ('{"a" 1}', "expected ':'", 5),
    ('{"a": 1 "b": 2}', "expected ',' or '}'", 8),
    ('{"a": x}', "not valid JSON", 6),
    ('{"a": [1, 2, }]}', "not valid JSON", 13),
    ('{"a": 1} {}', "extra data after the JSON object", 9),
    ("[1, 2]", "expected a JSON object, found an array", 0),
    ("", "expected a JSON object, found the end of the file", 0),
    ('\ufeff{"a": 1}', "expected a JSON object", 0),  # a byte-order mark, as json.load refuses
]


@pytest.mark.parametrize("text, message, at", BAD)
def test_malformed_files_name_the_file_and_the_position(tmp_path, text, message, at):
    path = _write(tmp_path, text, "bad file.json")
    with contextlib.suppress(json.JSONDecodeError):  # json.load: an error, or no object
        assert not isinstance(json.loads(text), dict)
    for chunk in (1, 4, CHUNK):  # the same answer wherever the window ends
        with pytest.raises(ValueError) as err:
            list(iter_object(path, chunk=chunk))
        assert str(err.value).startswith(f"{path}: {message}")
        assert str(err.value).endswith(f"at character {at}")


def test_unreadable_files_name_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text"):
        list(iter_object(path))
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        list(iter_object(tmp_path / "missing.json"))
    path = _write(tmp_path, '{"questions": "abc"}')
    with pytest.raises(ValueError, match=r"expected an array for 'questions', found a string"):
        list(iter_object(path, stream="questions"))


# ---------------------------------------------------------------------------------------------
# The builders on the reader


def test_gqa_plan_streamed_equals_plan_of_the_loaded_file(tmp_path):
    recs = json.loads(GQA_Q.read_text())
    streamed = gqa.plan(gqa.iter_questions(GQA_Q), where="x")
    assert list(streamed) == list(gqa.plan(recs, where="x"))
    assert streamed[0]["dialogue_id"] == "gqa-n100-0" and len(streamed) == 3
    assert streamed[1:] == [streamed[1], streamed[2]]
    assert list(streamed.take([2, 0])) == [streamed[2], streamed[0]]
    # A repeated question id: json.load keeps the last record, in the first one's place.
    text = GQA_Q.read_text().replace('"999":', '"1000":', 1)
    path = _write(tmp_path, text, "dup.json")
    assert list(gqa.plan(gqa.iter_questions(path), where="x")) == list(
        gqa.plan(json.loads(text), where="x")
    )


def test_truncated_gqa_file_names_file_and_position(tmp_path):
    text = GQA_Q.read_text()
    path = _write(tmp_path, text[: len(text) // 2], "cut.json")
    with pytest.raises(ValueError, match=r"cut\.json: the file ends .* at character \d+"):
        gqa.build(path, FIX / "gqa" / "images", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"cut\.json: the file ends"):
        gqa.count_dialogues(path)


def test_vqav2_file_without_the_list_names_it(tmp_path):
    path = _write(tmp_path, '{"info": {}, "annotation": []}', "a.json")
    q = FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    with pytest.raises(ValueError, match=r"a\.json: expected a JSON object with a list"):
        vqav2.plan(q, path)


# ---------------------------------------------------------------------------------------------
# Saving without mapping the dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A file-backed MT-GQA build of 125 dialogues (real JPEGs, several record batches)."""
    tmp = tmp_path_factory.mktemp("built")
    data_scale.write_gqa_set(tmp / "set", 125, images=tmp / "images")
    return gqa.build(tmp / "set" / "questions.json", tmp / "images", cache_dir=tmp / "cache")


def _batches(folder: Path) -> list[tuple[str, list[int], pa.Table]]:
    out = []
    for f in sorted(folder.glob("*.arrow")):
        with pa.OSFile(str(f), "rb") as src:
            batches = list(pa.ipc.open_stream(src))
        out.append((f.name, [b.num_rows for b in batches], pa.Table.from_batches(batches)))
    return out


@pytest.mark.parametrize(
    "config",
    [
        {},  # one shard; record batches of 100 rows
        {"MAX_SHARD_SIZE": "2MB"},  # several shards of uneven length
        {"DEFAULT_MAX_BATCH_SIZE": 30},  # a table size the writer's 100 does not divide
    ],
)
def test_saving_writes_the_folder_save_to_disk_writes(built, tmp_path, monkeypatch, config):
    for key, value in config.items():
        monkeypatch.setattr(datasets.config, key, value)
    assert saving.mapped_files(built)  # the streamed path, not save_to_disk itself
    built.save_to_disk(str(tmp_path / "ref"))
    saving.save_to_disk(built, tmp_path / "got")
    ref, got = _batches(tmp_path / "ref"), _batches(tmp_path / "got")
    assert [(name, sizes) for name, sizes, _ in got] == [(name, sizes) for name, sizes, _ in ref]
    assert all(g.equals(r) for (_, _, g), (_, _, r) in zip(got, ref, strict=True))
    if config.get("MAX_SHARD_SIZE"):
        assert len(got) > 1
    for name in ("state.json", "dataset_info.json"):
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    loaded = schema.load(tmp_path / "got")
    assert loaded[7]["image"].tobytes() == built[7]["image"].tobytes()


def test_size_estimate_is_the_one_save_to_disk_makes(built, tmp_path):
    assert saving._estimate_nbytes(built) == built._estimate_nbytes()
    # Cells holding only a path count the file's size (save_to_disk embeds it).
    data_scale.write_images(tmp_path, 3, seed=1)
    files = [str(f) for f in sorted(tmp_path.glob("*.jpg"))]

    def cells():
        yield from ({"image": f} for f in [*files, None])

    image = datasets.Features({"image": datasets.Image()})
    paths = datasets.Dataset.from_generator(cells, features=image, cache_dir=str(tmp_path / "c"))
    assert saving.mapped_files(paths)
    assert paths.with_format("arrow")[:1]["image"].to_pylist()[0]["bytes"] is None
    estimate = saving._estimate_nbytes(paths)
    assert estimate == paths._estimate_nbytes() > sum(Path(f).stat().st_size for f in files)


def test_saving_reads_concatenated_files_in_order(built, tmp_path):
    both = datasets.concatenate_datasets([built, built])
    assert saving.mapped_files(both) == saving.mapped_files(built) * 2
    both.save_to_disk(str(tmp_path / "ref"))
    saving.save_to_disk(both, tmp_path / "got")
    ref, got = _batches(tmp_path / "ref"), _batches(tmp_path / "got")
    assert [(n, s) for n, s, _ in got] == [(n, s) for n, s, _ in ref]
    assert all(g.equals(r) for (_, _, g), (_, _, r) in zip(got, ref, strict=True))


def test_saving_leaves_other_datasets_to_save_to_disk(built, tmp_path):
    in_memory = datasets.Dataset.from_dict({"a": [1, 2]})
    assert saving.mapped_files(in_memory) is None  # the synthetic world's, unchanged
    assert saving.mapped_files(built.select([2, 0])) is None  # an indices mapping
    assert saving.mapped_files(built.with_format("numpy")) is None
    assert saving.mapped_files(built.rename_column("targets", "t")) is None  # a replay
    saving.save_to_disk(in_memory, tmp_path / "mem")
    assert datasets.load_from_disk(str(tmp_path / "mem"))["a"][:] == [1, 2]


def test_image_presence_reads_chunks_as_the_whole_column(built):
    col = built.data.table.column("image")
    assert col.num_chunks > 1
    whole = schema.image_presence(pa.chunked_array([col.combine_chunks()]))
    assert schema.image_presence(col) == whole
    assert all(cell == {"bytes": b"<bytes>", "path": None} for cell in whole)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc only")
def test_released_pages_read_back_the_same_rows(built, tmp_path):
    saved = schema.load(schema.save(built, tmp_path / "saved"))
    files = residency.dataset_files(saved)
    assert files and all(f.startswith(str((tmp_path / "saved").resolve())) for f in files)
    before = [saved[i]["image"].tobytes() for i in range(len(saved))]  # maps every page
    mapped = _rss_file_kib()
    assert residency.release(files) >= sum(Path(f).stat().st_size for f in files)
    assert _rss_file_kib() < mapped  # the pages stopped counting...
    assert [saved[i]["image"].tobytes() for i in range(len(saved))] == before  # ...not the data
    assert residency.release(("/no/such/file.arrow",)) == 0


def test_rows_release_their_files_every_few_reads(built, monkeypatch):
    calls = []
    monkeypatch.setattr(residency, "release", lambda files: calls.append(files) or 0)
    monkeypatch.setattr(residency, "_reads", {})
    for i in range(3 * residency.EVERY + 1):
        schema.row(built, i % len(built))
    assert calls == [residency.dataset_files(built)] * 3
    schema.row(datasets.Dataset.from_dict({"a": [1]}), 0)  # in memory: nothing to release
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# The bench


def test_generated_set_is_in_the_release_schema(tmp_path):
    small = data_scale.write_gqa_set(tmp_path / "s", 40, images=tmp_path / "img")
    large = data_scale.write_gqa_set(tmp_path / "l", 90, images=tmp_path / "img")
    for info, name in ((small, "s"), (large, "l")):
        path = tmp_path / name / "questions.json"
        assert gqa.count_dialogues(path) == info["dialogues"]
        recs = json.loads(path.read_text())
        assert len(recs) == info["questions"]
        rec = next(iter(recs.values()))
        assert {"imageId", "question", "answer", "types", "annotations", "semantic"} <= set(rec)
        assert len({r["imageId"] for r in recs.values()}) == info["images"]
    ids = {
        name: {
            r["imageId"]
            for r in json.loads((tmp_path / name / "questions.json").read_text()).values()
        }
        for name in ("s", "l")
    }
    assert ids["s"] < ids["l"]  # the images of a smaller set are a prefix of a larger one's


def test_bench_runs_end_to_end_and_writes_its_json(tmp_path):
    out = tmp_path / "results"
    rc = data_scale.main(
        ["--sizes", "30", "--rows", "30", "--out", str(out), "--tmp", str(tmp_path)]
    )
    assert rc == 0
    [path] = out.glob("data-scale-*.json")
    result = json.loads(path.read_text())
    [case] = result["sizes"]
    assert case["dialogues"] == 30 and case["prepare"]["rows"] == 30
    assert case["loading"]["rows"] == 30 and case["loading"]["pixels"] >= 30 * 320 * 240
    for kind in ("prepare", "loading"):
        m = case[kind]
        assert m["rss_after_imports_mib"] > 0 and m["peak_rss_mib"] >= m["rss_after_imports_mib"]
        assert m["wall_s"] > 0
    assert result["ratio_largest_to_smallest"] == {
        "dialogues": [30, 30],
        "prepare": 1.0,
        "loading": 1.0,
    }
    assert result["criterion"] == {"max_ratio": 1.2, "met": True}
    assert result["machine"]["cpu_count"] >= 1 and "VmHWM" in result["peak_rss"]
    assert not list(tmp_path.glob("data-scale-*"))  # the temporary sets are gone
