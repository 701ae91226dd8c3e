"""The base stage and the params of real archs: names vs sources (``models:``), slugs, the
tiny teacher's reuse by recipe_sha, and the base report for a tiny and a real arch.

No real teacher is trained here: ``mc_core.training.teacher.train_teacher`` is replaced by a
stand-in
that saves a small random model as the real one would (``zoo.save`` with the meta).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mc_core.data import schema
from mc_core.data import synthetic as S
from mc_core.models import zoo
from tasks import base as stage
from tasks import common
from tasks import params as config

ROOT = Path(__file__).resolve().parents[1]
RAW = config.read_yaml(ROOT / "params.yaml")
SMALL = dict(text_hidden=64, text_intermediate=128, vision_hidden=32, vision_intermediate=64)


def _params(**sections) -> dict:
    raw = json.loads(json.dumps(RAW))
    raw.update(sections)
    return raw


# -- names vs sources ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"),
        ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl-7b-instruct"),
        ("/data/ckpt/qwen2-vl/", "qwen2-vl"),
        ("~/models/My Model", "my-model"),
        ("C:\\ckpt\\InternVL3", "internvl3"),
    ],
)
def test_slug_is_a_readable_safe_name(value, name):
    assert config.slug(value) == name and config.SAFE_NAME.match(name)


def test_slug_collisions_and_empty_names_are_errors():
    with pytest.raises(ValueError, match="'b/m' and 'a/m' would both be named 'm'"):
        config.slugs(["a/m", "b/m"])
    with pytest.raises(ValueError, match="an existing arch would both be named 'tiny-llava'"):
        config.slugs(["org/tiny-llava"], taken=["tiny-llava"])
    with pytest.raises(ValueError, match="no readable name"):
        config.slug("/data/___/")


@pytest.mark.parametrize(
    ("arch", "fix"),
    [
        (
            "llava-hf/llava-1.5-7b-hf",
            "`models: {llava-1.5-7b-hf: {source: 'llava-hf/llava-1.5-7b-hf'}}` and put "
            "`llava-1.5-7b-hf` in grid.archs",
        ),
        ("/data/ckpt/qwen2-vl", "`models: {qwen2-vl: {source: '/data/ckpt/qwen2-vl'}}`"),
        ("~/ckpt", "`models: {ckpt: {source: '~/ckpt'}}`"),
        ("LLaVA-7B", "`models: {llava-7b: {source: 'LLaVA-7B'}}`"),
    ],
)
def test_hf_ids_and_paths_in_grid_archs_fail_with_the_exact_fix(arch, fix):
    raw = _params(grid={"archs": ["tiny-llava", arch], "rates": [0.9]})
    with pytest.raises(ValueError) as err:
        config.validate(raw)
    msg = str(err.value)
    assert f"grid.archs[1]={arch!r}" in msg and fix in msg


def test_grid_names_a_source_already_in_models():
    raw = _params(
        grid={"archs": ["llava-hf/llava-1.5-7b-hf"], "rates": [0.9]},
        models={"llava7": {"source": "llava-hf/llava-1.5-7b-hf"}},
    )
    with pytest.raises(ValueError, match="models.llava7 has this source: put 'llava7' there"):
        config.validate(raw)


def test_models_names_are_archs_and_resolve_to_their_source():
    raw = _params(
        grid={"archs": ["tiny-llava", "llava-1.5-7b", "my-qwen"], "rates": [0.9]},
        models={"my-qwen": {"source": "/data/ckpt/qwen2-vl"}},
        train={**RAW["train"], "overrides": {"my-qwen": {"lr": 0.001}}},
    )
    p = config.validate(raw)
    assert [config.cell_key(a, r) for a, r in p.grid.cells()][-1] == "my-qwen-0.9"
    assert config.source_of(p.models, "my-qwen").source == "/data/ckpt/qwen2-vl"
    assert config.source_of(p.models, "llava-1.5-7b").source == "llava-hf/llava-1.5-7b-hf"
    assert config.source_of(p.models, "tiny-llava") is None
    assert p.train.for_cell("my-qwen", 0.9).lr == 0.001


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ({"Org/Model": {"source": "x"}}, r"models: name 'Org/Model' is not a safe .* 'model'"),
        ({"tiny-llava": {"source": "x"}}, r"models: name 'tiny-llava' is a tiny architecture"),
        ({"m": {"source": ""}}, r"models.m.source"),
        ({"m": {"src": "x"}}, r"models.m.src"),
    ],
)
def test_bad_models_entries_are_named(models, match):
    with pytest.raises(ValueError, match=match):
        config.validate(_params(models=models))


def test_unknown_safe_name_suggests_a_models_entry():
    with pytest.raises(ValueError, match=r"add `models: \{mine: \{source: <HF id or folder>"):
        config.validate(_params(grid={"archs": ["mine"], "rates": [0.9]}))


def test_every_stage_refuses_before_compute(tmp_path, monkeypatch):
    bad = _params(grid={"archs": ["llava-hf/llava-1.5-7b-hf"], "rates": [0.9]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(common.PARAMS_ENV, raising=False)

    def forbidden(*a, **k):
        raise AssertionError("compute before validation")

    monkeypatch.setattr(zoo, "load", forbidden)
    with pytest.raises(ValueError, match="llava-1.5-7b-hf"):
        config.main([])
    with pytest.raises(ValueError, match="llava-1.5-7b-hf"):
        stage.main(["--arch", "llava-1.5-7b-hf"])


def test_cell_args_accept_models_names_only_as_names(tmp_path, monkeypatch):
    raw = _params(models={"my-qwen": {"source": "/data/q"}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(common.PARAMS_ENV, str(tmp_path / "p.yaml"))
    assert common.cell_args("x", ["--arch", "my-qwen", "--rate", "0.9"]) == ("my-qwen", 0.9)
    with pytest.raises(ValueError, match="unknown arch"):
        common.cell_args("x", ["--arch", "../my-qwen", "--rate", "0.9"])


# -- the tiny teacher: trained once per recipe --------------------------------------------------


@pytest.fixture
def fake_trainer(monkeypatch):
    """Replace train_teacher by a stand-in saving a small random model; records its calls."""
    from mc_core.training import teacher

    calls = []

    def train(arch, out_dir, cfg=None, *, world=None, meta=None, **_):
        calls.append(arch)
        model, processor = zoo.build(zoo.TINY[arch].with_sizes(**SMALL), seed=len(calls))
        zoo.save(model, processor, out_dir, meta={"arch": arch, **(meta or {})})
        return {
            "acc_avg": 0.5,
            "acc_turn": [0.5] * 3,
            "chance": 0.3,
            "n_dialogues": 3,
            "steps": {"stage1": 1, "stage2": 1, "stage3": 0},
            "curve": [[1, 1, 0.5]],
        }

    monkeypatch.setattr(teacher, "train_teacher", train, raising=False)
    return calls


def test_recipe_sha_reuse_and_retrain(tmp_path, fake_trainer, monkeypatch, capsys):
    monkeypatch.delenv(stage.RETRAIN_ENV, raising=False)
    p = config.validate(RAW)
    out = tmp_path / "models" / "base" / "tiny-llava"
    first = stage.tiny_teacher("tiny-llava", out, p.base, p.world)
    assert fake_trainer == ["tiny-llava"] and "training the teacher" in capsys.readouterr().out
    sha = stage.recipe_sha("tiny-llava", p.base, p.world)
    assert zoo.info(out)["recipe_sha"] == sha == first["recipe_sha"]
    weights = (out / "model.safetensors").read_bytes()

    assert stage.tiny_teacher("tiny-llava", out, p.base, p.world) == first  # reused
    assert fake_trainer == ["tiny-llava"] and "reusing" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == weights

    # The arch's overrides are part of the recipe, other archs' are not.
    other = p.base.model_copy(update={"arch_overrides": {"tiny-qwen2-vl": {"stage2_steps": 1}}})
    assert stage.recipe_sha("tiny-llava", other, p.world) == sha
    mine = p.base.model_copy(update={"arch_overrides": {"tiny-llava": {"stage2_steps": 1}}})
    assert stage.recipe_sha("tiny-llava", mine, p.world) != sha
    world = S.WorldConfig.from_dict({**p.world.to_dict(), "colour_jitter": 3})
    stage.tiny_teacher("tiny-llava", out, p.base, world)  # another world: retrained
    assert len(fake_trainer) == 2

    stage.tiny_teacher("tiny-llava", out, p.base, p.world)
    assert len(fake_trainer) == 3  # back to the first recipe: retrained, it was replaced
    monkeypatch.setenv(stage.RETRAIN_ENV, "1")
    stage.tiny_teacher("tiny-llava", out, p.base, p.world)
    assert len(fake_trainer) == 4 and "MC_RETRAIN is set" in capsys.readouterr().out
    monkeypatch.delenv(stage.RETRAIN_ENV)
    (out / stage.TEACHER_FILE).unlink()  # killed before the summary was written: retrain
    stage.tiny_teacher("tiny-llava", out, p.base, p.world)
    assert len(fake_trainer) == 5 and (out / stage.TEACHER_FILE).is_file()


# -- the stage end to end: report on data/test --------------------------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A stage's working directory: params.yaml (small evaluation) and data/test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(common.PARAMS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MC_CACHE", str(tmp_path / "mc-cache"))
    monkeypatch.delenv(stage.RETRAIN_ENV, raising=False)
    schema.save(S.generate(2, 1), "data/test")
    before = torch.get_num_threads()

    def write(**sections) -> None:
        ev = {**RAW["evaluate"], "max_dialogues": 2, "batch_size": 2, "progress": False}
        ev["device"] = "cpu"
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(evaluate=ev, **sections)))

    yield write
    torch.set_num_threads(before)


def _report_keys(report: dict) -> None:
    for key in (
        "acc_avg",
        "acc_turn",
        "acc_blank_image",
        "acc_sample_r0.9",
        "chance",
        "acc_selector_packed_r0.9",
        "n_dialogues",
        "visual_tokens",
        "arch",
        "family",
        "source",
        "revision",
    ):
        assert key in report, key
    assert report["n_dialogues"] == 2 and len(report["acc_turn"]) == 3
    assert report["chance"] is not None and report["acc_selector_packed_r0.9"] is not None


def test_tiny_arch_report_on_data_test(workspace, fake_trainer, tmp_path):
    workspace()
    report = stage.main(["--arch", "tiny-llava"])
    _report_keys(report)
    assert report["family"] == "llava" and report["source"] is None
    assert report["steps"] == {"stage1": 1, "stage2": 1, "stage3": 0} and report["curve"]
    assert report["world_eval"]["acc_avg"] == 0.5 and report["visual_tokens"] == 256
    written = json.loads((tmp_path / "reports/base/tiny-llava.json").read_text())
    assert written == report
    again = stage.main(["--arch", "tiny-llava"])  # reused: same weights, same report
    assert fake_trainer == ["tiny-llava"] and again == report


def test_real_arch_is_pinned_not_copied_and_reported(workspace, hf_snapshot, tmp_path):
    src = tmp_path / "ckpt" / "llava-snap"
    shutil.copytree(hf_snapshot("llava"), src)
    workspace(grid={"archs": ["snap"], "rates": [0.9]}, models={"snap": {"source": str(src)}})
    report = stage.main(["--arch", "snap"])
    _report_keys(report)
    assert (report["family"], report["source"], report["revision"]) == ("llava", "llava-snap", None)
    out = tmp_path / "models/base/snap"
    assert sorted(p.name for p in out.iterdir()) == ["resolved.json", "zoo.json"]
    for f in (*out.iterdir(), tmp_path / "reports/base/snap.json"):
        assert str(tmp_path) not in f.read_text(), f
    model, _ = zoo.load(out)  # what train / evaluate / register do
    assert type(model).__name__ == "LlavaForConditionalGeneration"
