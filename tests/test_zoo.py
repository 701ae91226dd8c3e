"""The model zoo: tiny architectures build, run, save and load offline; real specs are named."""

from __future__ import annotations

import pytest
import torch

from mc_core.data import synthetic as S
from mc_core.models import zoo

# Test-sized models (contracts: text hidden <= 64, vision hidden <= 32, 2 layers).
SMALL = dict(text_hidden=64, text_intermediate=128, vision_hidden=32, vision_intermediate=64)


def _small(arch: str) -> zoo.TinySpec:
    return zoo.TINY[arch].with_sizes(**SMALL)


def _inputs(processor, image, question="what colour is at row 1 column 2 ?"):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(images=[image], text=[text], return_tensors="pt")


@pytest.fixture(scope="module")
def image():
    return S.example(0, 0, S.WorldConfig())[1]


@pytest.mark.parametrize(
    "arch,n_visual", [("tiny-llava", 256), ("tiny-llava-next", 528), ("tiny-qwen2-vl", 144)]
)
def test_build_runs_with_expected_visual_tokens(arch, n_visual, image):
    model, processor = zoo.build(_small(arch))
    inputs = _inputs(processor, image)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n == n_visual
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_llava_keeps_the_last_tower_layer():
    model, _ = zoo.build(_small("tiny-llava"))
    # A 2-layer tower with the default -2 would silently drop its last layer.
    assert model.config.vision_feature_layer == -1
    assert model.config.vision_feature_select_strategy == "default"


def test_llava_next_token_count_varies_with_the_image():
    model, processor = zoo.build(_small("tiny-llava-next"))
    wide = S.blank_image(S.WorldConfig()).resize((448, 224))  # (width, height): two crops
    n_wide = int((_inputs(processor, wide)["input_ids"] == model.config.image_token_id).sum())
    n_square = int(
        (
            _inputs(processor, S.blank_image(S.WorldConfig()))["input_ids"]
            == model.config.image_token_id
        ).sum()
    )
    assert n_wide != n_square


def test_same_seed_same_weights_other_seed_differs():
    a, _ = zoo.build(_small("tiny-llava"), seed=1)
    b, _ = zoo.build(_small("tiny-llava"), seed=1)
    c, _ = zoo.build(_small("tiny-llava"), seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("arch", sorted(zoo.TINY))
def test_save_load_roundtrip_same_logits(arch, image, tmp_path):
    model, processor = zoo.build(_small(arch), seed=3)
    out = zoo.save(model, processor, tmp_path / "m", meta={"note": "x"})
    assert not list(tmp_path.glob(".m.tmp-*"))  # no temporary folder left behind
    loaded, proc2 = zoo.load(out)
    assert type(loaded) is type(model)
    assert zoo.info(out)["note"] == "x"
    inputs = _inputs(proc2, image)
    assert torch.equal(inputs["input_ids"], _inputs(processor, image)["input_ids"])
    with torch.no_grad():
        # Same weights and processor: identical logits (up to float noise of sdpa vs eager).
        torch.testing.assert_close(
            loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5
        )


def test_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="tiny-nope"):
        zoo.build("tiny-nope")
    with pytest.raises(ValueError, match="zoo.json"):
        zoo.load(tmp_path)
    with pytest.raises(ValueError, match="bogus"):
        zoo.TINY["tiny-llava"].with_sizes(bogus=3)
    with pytest.raises(ValueError, match="real model"):
        zoo.load_real("nope")


def test_real_specs_name_the_checkpoints():
    ids = {s.hf_id for s in zoo.REAL.values()}
    assert {
        "llava-hf/llava-1.5-7b-hf",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    } <= ids
    assert any("InternVL" in i for i in ids)
    import transformers

    from mc_core.models import families

    for spec in zoo.REAL.values():
        assert hasattr(transformers, spec.model_class), spec.model_class
        # The named class is the one its family's descriptor builds.
        assert getattr(transformers, spec.model_class) is families.get(spec.family).model_class


def test_zoo_names_come_from_the_descriptors():
    from mc_core.models import families

    tiny = {n for f in families.all_families() for n in f.tiny}
    real = {n for f in families.all_families() for n in f.real}
    assert set(zoo.TINY) == tiny and set(zoo.REAL) == real
    assert {"tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"} <= tiny
    for name, spec in zoo.TINY.items():
        assert spec.name == name and spec.family in families.available()


def test_family_of_is_the_registry(tmp_path):
    from mc_core.models import families

    model, processor = zoo.build(_small("tiny-llava"))
    assert zoo._family_of(model) == families.for_model(model).name == "llava"
    out = zoo.save(model, processor, tmp_path / "m")
    assert families.for_config(out).name == zoo.info(out)["family"] == "llava"
    (out / "zoo.json").write_text('{"family": "gpt"}')
    with pytest.raises(ValueError, match="family='gpt'.*llava"):
        zoo.load(out)
