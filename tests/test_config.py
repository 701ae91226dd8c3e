"""params.yaml and dvc.yaml checked against the code that reads them; bad params fail early."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from mc_core.training.config import TrainConfig
from tasks import cells
from tasks import params as config

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# The params sections each stage's task reads (tasks/<stage>.py: PARAMS).
TASK_PARAMS = {
    "prepare": "tasks.prepare",
    "base": "tasks.base",
    "train": "tasks.train",
    "evaluate": "tasks.evaluate",
    "register": "tasks.register",
    "report": "tasks.report",
    "train-any": "tasks.train",
    "evaluate-any": "tasks.evaluate_any",
    "register-any": "tasks.register",
}


def _bad(**changes) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def test_params_yaml_is_valid_and_complete():
    p = config.validate(RAW)
    assert set(RAW) == set(config.SECTIONS)
    assert p.grid.cells()[0] == ("tiny-llava", 0.5) and len(p.grid.cells()) == 6
    assert [cells.cell_key(a, r) for a, r in p.grid.cells()][-1] == "tiny-qwen2-vl-0.9"


def test_sections_are_the_library_configs():
    """One config object per concept: the params sections are the library's own models."""
    from mc_core.data.synthetic import WorldConfig
    from mc_core.training.teacher import TeacherConfig

    p = config.validate(RAW)
    assert isinstance(p.train, TrainConfig) and isinstance(p.world, WorldConfig)
    assert isinstance(p.base, TeacherConfig)
    assert p.world == WorldConfig()  # params.yaml's world = the defaults
    # params.yaml lists every knob of the recipe (rates: null, a cell trains at its own rate)
    # and the pipeline's keys.
    assert set(RAW["train"]) - {"overrides", "any_rate"} == set(TrainConfig.model_fields)
    assert p.train.lr == RAW["train"]["lr"] and p.train.batch_size == RAW["train"]["batch_size"]


def test_mc_core_knows_nothing_of_the_pipeline():
    import mc_core.training.config as lib

    text = (ROOT / "mc_core" / "training" / "config.py").read_text()
    for word in ("dvc", "params.yaml", "profiles", "cell_key", "tasks."):
        assert word not in text.lower(), word
    assert not hasattr(lib, "Params") and not hasattr(lib, "PROFILES")


def test_evaluate_section_matches_evaluate_signature():
    from mc_core.evaluation.runner import evaluate

    accepted = set(inspect.signature(evaluate).parameters)
    pipeline = {"val_methods", "probe_methods", "ceilings"}
    assert set(config.EvaluateParams.model_fields) - pipeline <= accepted
    from mc_core.compressors import available

    assert set(RAW["evaluate"]["methods"]) <= set(available())
    # The data builders accept what SplitParams passes them.
    from mc_core.data import gqa, vqav2

    assert {"max_dialogues", "seed"} <= set(inspect.signature(gqa.build).parameters)
    assert {"split", "max_dialogues", "seed"} <= set(inspect.signature(vqav2.build).parameters)


def test_dvc_stage_params_match_what_tasks_read():
    stages = DVC["stages"]
    for stage, module in TASK_PARAMS.items():
        declared = stages[stage]["params"]
        assert sorted(declared) == sorted(importlib.import_module(module).PARAMS), stage
    every = {p for s in stages.values() for p in s.get("params", [])}
    assert every == set(config.SECTIONS)  # no section is dead weight


def test_dvc_code_deps_exist_and_own_code_is_listed():
    for name, stage in DVC["stages"].items():
        deps = stage["deps"]
        module = re.match(r"python -m (tasks\.\w+)", stage["cmd"]).group(1)
        assert module.replace(".", "/") + ".py" in deps, name
        assert "tasks/params" in deps, name  # every stage validates the whole file
        assert "tasks/cells.py" in deps, name  # and names its outputs through it
        for dep in deps:
            if dep.startswith(("tasks/", "mc_core/", "mc_registry")):
                assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"


def test_section_view_refuses_undeclared_sections():
    view = config.SectionView(config.validate(RAW), ("train",), who="tasks.x")
    assert view.train.lr == RAW["train"]["lr"]
    with pytest.raises(AttributeError, match="tasks.x reads params section 'data'"):
        _ = view.data
    reg = config.SectionView(config.validate(RAW), ("register",), who="t")
    assert reg.register.model_name("tiny-llava", 0.9) == "metacompress-tiny-llava-r0.9"
    assert reg.register.model_name("tiny-llava", 0.9, "other") in (
        "other-tiny-llava-r0.9",
        "metacompress-tiny-llava-r0.9",
    )  # {method} is optional


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid__rates__1": 1.5}, r"params.yaml: grid.rates\[1\]=1.5: rate must be in \(0, 1\)"),
        ({"grid__rates__0": 0.0}, r"grid.rates\[0\]=0.0: rate must be in \(0, 1\)"),
        ({"grid__archs__1": "tiny-gpt"}, r"grid.archs\[1\]='tiny-gpt': unknown arch; known: "),
        ({"train__lrr": 0.1}, r"params.yaml: train.lrr: Extra inputs are not permitted"),
        ({"train__lr": -1.0}, r"params.yaml: train.lr=-1.0: Input should be greater than 0"),
        ({"train__epochs": 2.5}, r"params.yaml: train.epochs=2.5: Input should be a valid integer"),
        ({"train__method": "sample"}, r"params.yaml: train.method='sample' is not trainable"),
        (
            {"train__compressor_kwargs": {"dc": 8}},
            r"params.yaml: train.compressor_kwargs.dc: not a keyword of metacompress",
        ),
        ({"evaluate__methods__0": "magic"}, r"evaluate.methods\[0\]='magic': unknown method"),
        ({"evaluate__methods": ["none", "sample"]}, r"must include train.method='metacompress'"),
        ({"world__grid": 12}, r"params.yaml: world: WorldConfig.grid=12"),
        ({"world__grdi": 4}, r"params.yaml: world.grdi: Unexpected keyword argument"),
        ({"base__stage1_lrr": 1}, r"params.yaml: base.stage1_lrr: Extra inputs are not permitted"),
        ({"data__test": {"source": "gqa"}}, r"data.test: .*source 'gqa' needs \['questions'"),
        ({"register__name_template": "x-{arch}"}, r"register.name_template='x-\{arch\}'"),
        # The any-rate compressors (grid.any_rate_archs, train.any_rate).
        (
            {"grid__any_rate_archs": ["tiny-llava-next"]},
            r"grid: .*any_rate_archs\[0\]='tiny-llava-next' is not in grid.archs",
        ),
        ({"grid__probe_rates": [0.6, 0.9]}, r"probe_rates \[0.9\] are grid.rates already"),
        ({"grid__probe_rates__0": 1.2}, r"grid.probe_rates\[0\]=1.2: rate must be in \(0, 1\)"),
        ({"train__rates": [0.5, 0.9]}, r"train.rates=\[0.5, 0.9\]: a cell trains at its own"),
        (
            {"train__overrides": {"tiny-llava": {"rates": [0.5, 0.9]}}},
            r"overrides.tiny-llava.rates: a cell trains at its own rate",
        ),
        ({"train__any_rate": {"epochs": 60}}, r"train.any_rate.rates: missing"),
        (
            {"train__any_rate__rates": [0.9, 0.5]},
            r"train.any_rate.rates=\[0.9, 0.5\]: a range \[lo, hi\] needs lo < hi",
        ),
        ({"train__any_rate__epochs": 0}, r"train.any_rate.epochs=0: "),
        ({"train__any_rate__lrr": 1}, r"train.any_rate.lrr: not a train key"),
        (
            {"train__any_rate__rates": [0.6, 0.95]},
            r"spans \[0.6, 0.95\], which misses grid.rates \[0.5\]",
        ),
        ({"train__any_rate": {}}, r"grid.any_rate_archs=.*train.any_rate is empty"),
        (
            {"register__any_name_template": "x-{arch}-r{rate}"},
            r"any_name_template.*an any-rate compressor has no one rate",
        ),
        ({"evaluate__probe_methods": ["fastv"]}, r"probe_methods\[0\]='fastv': not a prompt"),
    ],
)
def test_bad_params_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        config.validate(_bad(**changes), source="params.yaml")


def test_profiles():
    smoke = config.validate(config.profile_params("smoke", RAW))
    assert smoke.grid.archs == ["tiny-llava"] and smoke.train.max_steps == 120
    assert smoke.world == config.validate(RAW).world  # untouched sections come from params.yaml
    full = config.validate(config.profile_params("full", RAW))
    assert "tiny-llava-next" in full.grid.archs and len(full.grid.cells()) == 9
    assert config.profile_params("default", RAW) == RAW
    with pytest.raises(ValueError, match="profile='huge': unknown profile"):
        config.profile_params("huge", RAW)
    with pytest.raises(ValueError, match=r"profile 'smoke': grid.rates\[0\]=2"):
        config.profile_params("smoke", RAW, extra={"grid": {"rates": [2]}})


def test_params_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ValueError, match="p.yaml: invalid YAML"):
        config.load(bad)
    with pytest.raises(ValueError, match="missing.yaml: params file not found"):
        config.load(tmp_path / "missing.yaml")


def test_cli_validates_and_prints_cells(tmp_path, capsys):
    config.main([str(ROOT / "params.yaml")])
    assert capsys.readouterr().out.split() == [
        cells.cell_key(a, r) for a, r in config.validate(RAW).grid.cells()
    ]
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(_bad(grid__rates__1=1.5)))
    with pytest.raises(ValueError, match=r"grid.rates\[1\]=1.5"):
        config.main([str(bad)])


@pytest.mark.parametrize(
    "module, argv",
    [
        ("tasks.prepare", None),
        ("tasks.train", ["--arch", "tiny-llava", "--rate", "0.5"]),
        ("tasks.evaluate", ["--arch", "tiny-llava", "--rate", "0.5"]),
        ("tasks.register", ["--arch", "tiny-llava", "--rate", "0.5"]),
        ("tasks.report", []),
    ],
)
def test_stages_fail_before_compute(module, argv, tmp_path, monkeypatch):
    """Every stage validates the whole params file before loading data or models."""
    import mc_core.data.schema as schema
    import mc_core.data.synthetic as synthetic
    import mc_core.models.zoo as zoo

    def forbidden(*a, **k):
        raise AssertionError("compute started before params were validated")

    for mod, name in ((zoo, "load"), (schema, "load"), (synthetic, "generate")):
        monkeypatch.setattr(mod, name, forbidden)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_bad(grid__rates__1=1.5)))
    monkeypatch.setenv("MC_PARAMS", str(bad))
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    with pytest.raises(ValueError, match=r"grid.rates\[1\]=1.5: rate must be in \(0, 1\)"):
        main(argv) if argv is not None else main()


def test_cli_rate_checked(tmp_path, monkeypatch):
    from tasks import common

    with pytest.raises(ValueError, match=r"--rate=1.5: rate must be in \(0, 1\)"):
        common.cell_args("x", ["--arch", "tiny-llava", "--rate", "1.5"])
    with pytest.raises(ValueError, match=r"--rate=nan: rate must be in \(0, 1\)"):
        common.cell_args("x", ["--arch", "tiny-llava", "--rate", "nan"])
    with pytest.raises(ValueError, match=r"--arch='\.\./x': unknown arch"):
        common.cell_args("x", ["--arch", "../x", "--rate", "0.5"])
    assert common.cell_args("x", ["--arch", "tiny-llava", "--rate", "0.5"]) == ("tiny-llava", 0.5)


def test_cell_names():
    """One module names every cell's stages, folders, reports, runs and registered model."""
    assert cells.cell_key("tiny-llava", 0.9) == "tiny-llava-0.9"
    assert cells.stage_name("train", cells.cell_key("a", 0.5)) == "train@a-0.5"
    assert cells.stage_name("report") == "report"
    assert cells.split_stage("train@a-0.5") == ("train", "a-0.5")
    assert cells.split_stage("report") == ("report", "")
    assert cells.arch_of("tiny-llava-next-0.75") == "tiny-llava-next"
    assert cells.compressor_dir("tiny-llava", 0.9) == Path("models/compressors/tiny-llava-r0.9")
    assert cells.seeds_dir("a", 0.5) == Path("models/compressors/a-r0.5-seeds")
    assert cells.cell_file("eval", "a", 0.75) == Path("reports/eval/a-0.75.json")
    assert cells.report_file("base", "a") == Path("reports/base/a.json")
    assert cells.run_name("a", "0.5") == "train-a-r0.5"
    assert cells.override_key("a", 0.9) == "a@0.9" and cells.override_key("a") == "a"
    assert cells.parse_override_key("a@0.9") == ("a", 0.9)
    assert cells.model_name("tiny-llava", 0.9) == "metacompress-tiny-llava-r0.9"
    # dvc.yaml spells the same names: its matrix writes the rate as format_rate does.
    train = DVC["stages"]["train"]
    assert "models/compressors/${item.arch}-r${item.rate}" in train["outs"]
    assert {"reports/train/${item.arch}-${item.rate}.json": {"cache": False}} in train["outs"]
    metrics = DVC["stages"]["metrics"]["metrics"][0]
    assert "reports/metrics/${item.arch}-${item.rate}.json" in metrics
    for bad in (1.5, 0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"grid.rates\[0\]=.*rate must"):
            cells.check_rate(bad, "grid.rates[0]")


def test_any_rate_names_and_recipe():
    """The any-rate compressor of an arch: its names, its recipe (shared, arch, any_rate) and
    its --rate any argument."""
    from tasks import common

    p = config.validate(RAW)
    assert cells.cell_key("tiny-llava", cells.ANY) == "tiny-llava-any"
    assert cells.compressor_dir("a", cells.ANY) == Path("models/compressors/a-any")
    assert cells.cell_file("eval", "a", cells.ANY) == Path("reports/eval/a-any.json")
    assert cells.any_method("metacompress") == "metacompress-any"
    assert p.register_.model_name("tiny-llava", cells.ANY) == "metacompress-tiny-llava-any"
    assert p.grid.any_rates() == sorted({*p.grid.rates, *p.grid.probe_rates})
    cfg = p.train.for_any("tiny-qwen2-vl")
    assert cfg.rates == RAW["train"]["any_rate"]["rates"]
    assert cfg.epochs == RAW["train"]["any_rate"]["epochs"]
    # The arch's override applies, a cell's does not (tiny-qwen2-vl@0.9 sets lr).
    assert cfg.lr == RAW["train"]["lr"] and p.train.for_cell("tiny-qwen2-vl", 0.9).lr != cfg.lr
    assert p.train.for_cell("tiny-llava", 0.5).rates is None
    assert common.cell_args("x", ["--arch", "tiny-llava", "--rate", "any"], any_rate=True) == (
        "tiny-llava",
        cells.ANY,
    )
    with pytest.raises(ValueError, match=r"--rate='any': expected a number in \(0, 1\)$"):
        common.cell_args("x", ["--arch", "tiny-llava", "--rate", "any"])
    with pytest.raises(ValueError, match=r"--rate='fast': expected a number in \(0, 1\) or 'any'"):
        common.cell_args("x", ["--arch", "tiny-llava", "--rate", "fast"], any_rate=True)
    empty = config.validate(_bad(grid__any_rate_archs=[], train__any_rate={}))
    with pytest.raises(ValueError, match=r"train.any_rate: empty"):
        empty.train.for_any("tiny-llava")
