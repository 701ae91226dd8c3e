"""Per-arch / per-cell overrides of the recipe sections (tasks/params/overrides.py): one
mechanism for ``base.arch_overrides`` and ``train.overrides``, validated early."""

from __future__ import annotations

import pytest
import yaml
from test_config import ROOT

from mc_core.training.teacher import TeacherConfig
from tasks import cells
from tasks import params as config
from tasks.params import BaseParams, TrainParams


def test_cell_recipe_layers_shared_arch_then_cell():
    t = TrainParams(
        lr=0.02,
        epochs=30,
        overrides={
            "tiny-qwen2-vl": {"epochs": 40, "lr": 0.05},
            "tiny-qwen2-vl@0.9": {"lr": 0.01},
        },
    )
    q9 = t.for_cell("tiny-qwen2-vl", 0.9)
    assert (q9.lr, q9.epochs) == (0.01, 40)  # the cell's key wins over the arch's
    q5 = t.for_cell("tiny-qwen2-vl", 0.5)
    assert (q5.lr, q5.epochs) == (0.05, 40)
    ll = t.for_cell("tiny-llava", 0.9)
    assert (ll.lr, ll.epochs) == (0.02, 30)
    assert t.applied("tiny-qwen2-vl", 0.9) == {"lr": 0.01, "epochs": 40}
    assert t.applied("tiny-llava", 0.9) == {}
    assert "overrides" not in q9.model_dump()  # the cell's TrainConfig is a plain recipe
    # The cell's fingerprint (resume / checkpoint identity) differs only where the recipe does.
    assert (
        ll.fingerprint()
        == TrainParams(lr=0.02, epochs=30).for_cell("tiny-llava", 0.9).fingerprint()
    )


def test_arch_recipe_of_base_uses_the_same_mechanism():
    b = BaseParams(stage2_steps=700, arch_overrides={"tiny-qwen2-vl": {"stage2_steps": 6000}})
    q = b.for_arch("tiny-qwen2-vl")
    assert type(q) is TeacherConfig and q.stage2_steps == 6000 and q.arch_overrides == {}
    assert b.for_arch("tiny-llava").stage2_steps == 700
    assert b.applied("tiny-qwen2-vl") == {"stage2_steps": 6000} and b.applied("tiny-llava") == {}
    # The same recipe as the library's own rule (what a teacher's recipe_sha was made from).
    plain = TeacherConfig(
        stage2_steps=700, arch_overrides={"tiny-qwen2-vl": {"stage2_steps": 6000}}
    )
    assert q == plain.for_arch("tiny-qwen2-vl")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"nope": {"lr": 0.1}}, r"overrides\.nope: unknown arch 'nope'"),
        ({"tiny-llava@1.5": {"lr": 0.1}}, r"overrides\.tiny-llava@1\.5: .*must be in \(0, 1\)"),
        ({"tiny-llava@x": {"lr": 0.1}}, r"rate 'x' is not a number"),
        ({"tiny-llava": {"lrr": 0.1}}, r"overrides\.tiny-llava: \['lrr'\] are not train keys"),
        ({"tiny-llava": {"lr": -1.0}}, r"overrides\.tiny-llava: .*lr"),
        ({"tiny-llava": {}}, r"non-empty mapping"),
    ],
)
def test_bad_overrides_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainParams(overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"nope": {"stage2_steps": 1}}, r"base\.arch_overrides\.nope: unknown arch 'nope'"),
        ({"tiny-llava@0.5": {"stage2_steps": 1}}, r"arch_overrides\.tiny-llava@0\.5: .*per arch"),
        ({"tiny-llava": {"lr": 1}}, r"arch_overrides\.tiny-llava: \['lr'\] are not base keys"),
        ({"tiny-llava": {"stage3_steps": -1}}, r"arch_overrides\.tiny-llava: base\.stage3_steps"),
        ({"tiny-llava": {}}, r"non-empty mapping"),
    ],
)
def test_bad_base_overrides_are_named_as_train_ones(overrides, match):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base"]["arch_overrides"] = overrides
    with pytest.raises(ValueError, match=match):
        config.validate(raw)


def test_models_names_are_archs_for_both_sections():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"] = {"my-qwen": {"source": "/data/qwen"}}
    raw["base"]["arch_overrides"] = {"my-qwen": {"stage2_steps": 1}}
    raw["train"]["overrides"] = {"my-qwen@0.9": {"lr": 0.001}}
    p = config.validate(raw)
    assert p.base.for_arch("my-qwen").stage2_steps == 1
    assert p.train.for_cell("my-qwen", 0.9).lr == 0.001


def test_parse_key():
    assert cells.parse_override_key("tiny-llava") == ("tiny-llava", None)
    assert cells.parse_override_key("tiny-llava@0.75") == ("tiny-llava", 0.75)
    assert cells.parse_override_key(cells.override_key("tiny-llava", 0.75)) == ("tiny-llava", 0.75)
    with pytest.raises(ValueError):
        cells.parse_override_key("@0.5")
