"""Offline processors: word tokenizer, chat-template prefix property, classes, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, assistant_turn, make_image, user_turn

from mc_core.models import families
from mc_core.models.processors import build_processor, load_processor, special_tokens


def _cfg(family: str) -> dict:
    """Every registered family is swept with its test model's image settings."""
    return dict(families.get(family).test.image_cfg)


DIALOGUE = [
    user_turn("what colour is at row 2 col 3 ?", images=1),
    assistant_turn("red"),
    user_turn("what shape is at row 1 col 1 ?"),
    assistant_turn("circle"),
    user_turn("how many blue ?"),
]


@pytest.fixture(scope="module", params=FAMILIES)
def family_processor(request):
    return request.param, build_processor(request.param, VOCAB, **_cfg(request.param))


def test_real_processor_class_and_words(family_processor):
    family, proc = family_processor
    assert type(proc) is families.get(family).processor_class
    # The family's own transformers processor class (or an offline subclass of it).
    stock = [c for c in type(proc).__mro__ if c.__module__.startswith("transformers.models.")]
    assert stock and stock[0].__name__.endswith("Processor")
    assert type(proc.image_processor).__name__.endswith("ImageProcessorPil")
    tok = proc.tokenizer
    words = tok.convert_ids_to_tokens(tok("what colour is at row 2 col 3 ?")["input_ids"])
    assert words == ["what", "colour", "is", "at", "row", "2", "col", "3", "?"]
    # Punctuation is split off and unknown words map to unk.
    ids = tok("col 3? zebra", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["col", "3", "?", special_tokens(family)["unk"]]
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.unk_token_id
    assert tok.convert_tokens_to_ids(special_tokens(family)["image"]) != tok.unk_token_id


def test_chat_template_prefix_property_in_text_and_ids(family_processor):
    family, proc = family_processor
    image = make_image(40, 60)
    eot = special_tokens(family)["end_of_turn"]
    previous_ids = None
    for k in (1, 3, 5):  # after user turns 1, 2, 3
        text = proc.apply_chat_template(DIALOGUE[:k], add_generation_prompt=True, tokenize=False)
        if k > 1:
            prev = proc.apply_chat_template(
                DIALOGUE[: k - 2], add_generation_prompt=True, tokenize=False
            )
            assert text.startswith(prev)
            # The answer is closed by the end-of-turn token.
            answer = DIALOGUE[k - 2]["content"][0]["text"]
            assert text[len(prev) :].lstrip().startswith(answer + eot)
        ids = proc(images=[image], text=[text], return_tensors="pt")["input_ids"][0]
        if previous_ids is not None:
            assert torch.equal(ids[: len(previous_ids)], previous_ids)
        previous_ids = ids
    # The image placeholder appears only in the first user turn.
    full = proc.apply_chat_template(DIALOGUE, add_generation_prompt=True, tokenize=False)
    assert full.count(special_tokens(family)["image"]) == 1


def test_save_load_round_trip(family_processor, tmp_path):
    family, proc = family_processor
    proc.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    assert type(again) is type(proc)
    assert again.chat_template == proc.chat_template
    text = proc.apply_chat_template(DIALOGUE, add_generation_prompt=True, tokenize=False)
    images = [make_image(40, 60), make_image(60, 40, seed=1)]
    a = proc(images=images[:1], text=[text], return_tensors="pt")
    b = again(images=images[:1], text=[text], return_tensors="pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert again.tokenizer.get_vocab() == proc.tokenizer.get_vocab()


def test_image_config_shapes():
    llava = build_processor("llava", VOCAB, image_size=64, patch_size=8)
    text = llava.apply_chat_template(
        [user_turn("what ?", 1)], add_generation_prompt=True, tokenize=False
    )
    out = llava(images=[make_image(30, 90)], text=[text], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert int((out["input_ids"] == llava.image_token_id).sum()) == 64  # (64 / 8)^2, CLS dropped
    qwen = build_processor("qwen2_vl", VOCAB, min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    out = qwen(
        images=[make_image(56, 56)],
        text=[text.replace("<image>", "<|image_pad|>")],
        return_tensors="pt",
    )
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56 px / 14 = 4 patches a side
    assert int((out["input_ids"] == qwen.image_token_id).sum()) == 4  # merged 2 x 2


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="family='gpt'"):
        build_processor("gpt", VOCAB)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        build_processor("llava", VOCAB, grid_pinpoints=[[64, 64]])
    with pytest.raises(ValueError, match="patch_size"):
        build_processor("llava", VOCAB, image_size=30, patch_size=8)
    with pytest.raises(ValueError, match=r"vocab\[1\]"):
        build_processor("llava", ["ok", "two words"])
    with pytest.raises(ValueError, match="min_pixels"):
        build_processor("qwen2_vl", VOCAB, min_pixels=10_000, max_pixels=100)
    with pytest.raises(ValueError, match="special_tokens|family"):
        special_tokens("bert")


def test_load_processor_rejects_non_processor_dir(tmp_path):
    with pytest.raises(ValueError, match="processor_config.json"):
        load_processor(tmp_path)
