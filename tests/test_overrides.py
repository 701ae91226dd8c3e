"""Per-arch / per-cell overrides of the train recipe (tasks/overrides.py), validated early."""

from __future__ import annotations

import pytest

from tasks.overrides import TrainParams, parse_key


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


def test_parse_key():
    assert parse_key("tiny-llava") == ("tiny-llava", None)
    assert parse_key("tiny-llava@0.75") == ("tiny-llava", 0.75)
    with pytest.raises(ValueError):
        parse_key("@0.5")
