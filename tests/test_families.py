"""Family descriptors: the registry, each descriptor's consistency, token layouts, detection."""

from __future__ import annotations

import pkgutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_image, user_turn

from mc_core.models import families, zoo
from mc_core.models.adapters import POSITIONS
from mc_core.models.families import adapter_for
from mc_core.models.families.base import Family
from mc_core.models.processors import build_processor

ROOT = Path(__file__).resolve().parents[1]


def _encode(processor, image, n_images: int = 1):
    text = processor.apply_chat_template(
        [user_turn("what ?", images=n_images)], add_generation_prompt=True, tokenize=False
    )
    return processor(images=[image] * n_images, text=[text], return_tensors="pt")


def test_every_module_registers_one_family():
    modules = {m.name for m in pkgutil.iter_modules(families.__path__)} - {"base"}
    assert set(families.available()) == modules
    assert {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl"} <= modules
    for fam in families.all_families():
        assert isinstance(fam, Family) and families.get(fam.name) is fam


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"family='gpt'.*\['internvl', 'llava'"):
        families.get("gpt")
    with pytest.raises(ValueError, match=r"model_type='bert' belongs to no family"):
        families.for_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="no family for model class 'Linear'"):
        families.for_model(torch.nn.Linear(2, 2))

    class Bad(Family):
        name = "bad"
        positions = "nearest"

    with pytest.raises(ValueError, match="positions='nearest'"):
        families.register(Bad)
    assert "bad" not in families.available()


def test_descriptor_is_consistent(tiny, each_family):
    fam = families.get(each_family)
    model, processor = tiny(each_family)
    assert type(model) is fam.model_class
    assert type(processor) is fam.processor_class
    assert fam.positions in POSITIONS
    adapter = adapter_for(model)
    assert type(adapter) is fam.adapter_class and adapter.family == fam.name
    assert adapter.positions == fam.positions
    # Detection by instance, by config object, by config.json dict.
    assert families.for_model(model) is fam
    assert families.for_config(model.config) is fam
    assert families.for_config(model.config.to_dict()) is fam
    tok = processor.tokenizer
    for role, token in fam.specials.items():
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id or role == "unk", role
    assert model.config.image_token_id == tok.convert_tokens_to_ids(fam.specials["image"])
    assert fam.image_keys >= set(fam.test.image_cfg)
    assert issubclass(fam.processor_class, fam.stock_processor_class)
    for name, spec in fam.tiny.items():
        assert spec.name == name and spec.family == fam.name
    for spec in fam.real.values():
        assert spec.family == fam.name and spec.model_class == fam.model_class.__name__


def test_for_config_reads_a_saved_checkpoint(tmp_path):
    model, processor = zoo.build(families.get("qwen2_vl").test, vocab=VOCAB)
    zoo.save(model, processor, tmp_path / "m")
    assert families.for_config(tmp_path / "m").name == "qwen2_vl"
    assert families.for_config(tmp_path / "m" / "config.json").name == "qwen2_vl"
    with pytest.raises(ValueError, match="no config.json"):
        families.for_config(tmp_path)


# Square sides each test model keeps as one view / tile (InternVL: one tile at 60 px).
SIDES = {"internvl": 60}


def test_token_grids_match_the_processor_and_the_model(tiny, each_family):
    fam = families.get(each_family)
    model, processor = tiny(each_family)
    side = SIDES.get(each_family, 56)
    grids = fam.token_grids(model.config, side)
    inputs = _encode(processor, make_image(side, side))
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n == sum(r * (c + int(newline)) for r, c, newline in grids)
    adapter = adapter_for(model)
    (x,) = adapter.visual_tokens(inputs)
    assert x.shape[0] == n
    (ctx,) = adapter.contexts(inputs)
    if len(grids) == 1 and not grids[0][2] and ctx.grid is not None:
        assert ctx.grid == grids[0][:2]  # the adapter's exact grid is the same layout


@pytest.mark.parametrize(
    "arch,side,expect",
    [
        ("tiny-llava", 224, ((16, 16, False),)),
        ("tiny-llava-next", 224, ((16, 16, False), (16, 16, True))),  # 528 tokens
        ("tiny-llava-next", 448, ((16, 16, False), (32, 32, True))),
        ("tiny-qwen2-vl", 224, ((12, 12, False),)),  # upsized to min_pixels = 336^2
    ],
)
def test_token_grids_of_the_world_architectures(arch, side, expect):
    spec = zoo.TINY[arch]
    fam = families.get(spec.family)
    processor = build_processor(spec.family, VOCAB, **spec.image_cfg)
    config = fam.tiny_config(spec, processor.tokenizer)
    assert fam.token_grids(config, side, processor) == expect
    inputs = _encode(processor, make_image(side, side))
    n = int((inputs["input_ids"] == config.image_token_id).sum())
    assert n == sum(r * (c + int(nl)) for r, c, nl in expect)


def test_token_grids_reject_a_side_the_processor_would_resize(tiny):
    model, _ = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="image_side=50 .*28"):
        families.get("qwen2_vl").token_grids(model.config, 50)


def test_family_knowledge_stays_in_its_files():
    """A family's name appears in at most its descriptor, its adapter and one more non-test
    module (the issue's bound: adding a family is one file plus its tests)."""
    out = subprocess.run(
        ["grep", "-ril", "internvl", "--include=*.py", "mc_core", "tasks", "flows", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert len(out) <= 3, out
    fifth = subprocess.run(
        [
            "grep",
            "-rl",
            "qwen2_5_vl\\|Qwen2_5_VL",
            "--include=*.py",
            "mc_core/models/families",
            "mc_core/models/adapters",
            "mc_core/models/processing.py",
            "mc_core/models/zoo.py",
            "bench/shapes.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert fifth == ["mc_core/models/families/qwen2_5_vl.py"], fifth
