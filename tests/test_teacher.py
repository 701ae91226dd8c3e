"""The teacher recipe on test-sized models: layouts, encodings, a short resumable run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mc_core import teacher as T
from mc_core import zoo
from mc_core.data import synthetic as S

SMALL = dict(text_hidden=64, text_intermediate=128, vision_hidden=32, vision_intermediate=64)
WORLD = S.WorldConfig()


def _small(arch: str) -> zoo.TinySpec:
    return zoo.TINY[arch].with_sizes(**SMALL)


@pytest.mark.parametrize("arch", sorted(zoo.TINY))
def test_layout_matches_the_models_visual_tokens(arch):
    model, processor = zoo.build(_small(arch))
    layout = T.layout_for(model, WORLD)
    pool = T.make_pool(0, 2, WORLD, layout)
    with torch.no_grad():
        feats = T.image_features(model, processor, [e.image for e in pool])
    assert [f.shape[0] for f in feats] == [layout.n, layout.n]
    for ex in pool:
        assert all(len(v) == layout.n for v in ex.labels.values())
        # Every object has one centre token per grid of the layout.
        assert (ex.labels["centre"] == 1).sum() == len(ex.scene.objects) * len(layout.grids)


def test_encode_positions_point_at_answers_and_slots():
    model, processor = zoo.build(_small("tiny-llava"))
    _, _, d = S.example(0, 4, WORLD)
    enc = T.encode(processor, d.questions, d.answers, d.question_types, 256,
                   image_token="<image>", end_token="</s>")
    tok = processor.tokenizer
    words = tok.convert_ids_to_tokens(enc.input_ids)
    assert words.count("<image>") == 256 and words[enc.image_start] == "<image>"
    for k in range(3):
        assert words[enc.answer_pos[k] + 1] == d.answers[k]
        assert words[enc.answer_pos[k] + 2] == "</s>"
        row_or_colour, col_or_shape, qtype = (words[p] for p in enc.slots[k])
        t = d.question_types[k]
        if t in ("colour", "shape"):
            assert qtype == t
            assert f"row {row_or_colour} column {col_or_shape}" in d.questions[k]
        elif t == "count":
            assert row_or_colour in WORLD.colours and qtype == "many"
        else:
            assert f"{row_or_colour} {col_or_shape}" in d.questions[k]


def test_look_targets_are_the_asked_objects_centres():
    layout = T.Layout((T.Grid(16, 16),))
    ex = T.make_pool(1, 1, WORLD, layout)[0]
    o = ex.scene.objects[0]
    q = f"what colour is at row {o.row + 1} column {o.col + 1} ?"
    keys = T._look_target(ex, q, "colour", WORLD)
    assert len(keys) == 1 and ex.labels["object"][keys[0]] == 0
    keys = T._look_target(ex, f"how many {o.colour} objects are there ?", "count", WORLD)
    assert keys[0] == -1  # the first token: the "none found" sink
    assert len(keys) - 1 == sum(p.colour == o.colour for p in ex.scene.objects)


def test_sampled_inputs_keep_ceil_ten_percent():
    model, processor = zoo.build(_small("tiny-qwen2-vl"))
    image = S.example(0, 0, WORLD)[1]
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "is there a red cross ?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    out = T._sampled_inputs(model, processor, inputs, 0.9)
    assert int((out["input_ids"] == model.config.image_token_id).sum()) == 7  # ceil(0.1 * 64)
    assert out["position_ids"].shape == (3, 1, out["input_ids"].shape[1])
    with torch.no_grad():
        assert torch.isfinite(model(**out).logits).all()


def test_short_run_trains_saves_and_reports(tmp_path):
    cfg = T.TeacherConfig(train_images=24, eval_dialogues=4, curve_dialogues=8,
                          stage1_seconds=60, stage1_max_steps=3, stage1_batch=4,
                          stage2_seconds=60, stage2_max_steps=3, stage2_batch=4,
                          checkpoint_every=2, curve_every_seconds=0.0, target_acc=2.0)
    events = []
    report = T.train_teacher("tiny-llava", tmp_path / "m", cfg, spec=_small("tiny-llava"),
                             callbacks=[events.append], progress=False)
    for key in ("acc_turn", "acc_avg", "acc_blank_image", "chance", "acc_sample_r0.9",
                "train_seconds", "curve"):
        assert key in report
    assert len(report["acc_turn"]) == 3 and 0.0 <= report["acc_avg"] <= 1.0
    assert report["steps"] == 3 and report["visual_tokens"] == 256
    assert {e["event"] for e in events} >= {"step", "stage", "curve", "done"}
    assert not (tmp_path / "m-ckpt.pt").exists()  # the checkpoint is removed once saved
    model, _ = zoo.load(tmp_path / "m")  # a plain transformers model, aids discarded
    assert not any("aids" in n for n, _ in model.named_parameters())
    path = T.write_report(report, tmp_path / "r.json")
    assert json.loads(path.read_text())["acc_avg"] == report["acc_avg"]


def test_resume_continues_from_the_checkpoint(tmp_path, monkeypatch):
    cfg = T.TeacherConfig(train_images=16, eval_dialogues=2, curve_dialogues=4,
                          stage1_seconds=60, stage1_max_steps=2, stage1_batch=4,
                          stage2_seconds=60, stage2_max_steps=4, stage2_batch=4,
                          checkpoint_every=2, curve_every_seconds=1e9, target_acc=2.0)
    spec = _small("tiny-llava")

    class Stop(Exception):
        pass

    def stop_at_stage2_step3(e):
        if e["event"] == "step" and e["stage"] == 2 and e["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        T.train_teacher("tiny-llava", tmp_path / "m", cfg, spec=spec,
                        callbacks=[stop_at_stage2_step3], progress=False)
    state = torch.load(tmp_path / "m-ckpt.pt", weights_only=False)
    assert (state["stage"], state["step"]) == (2, 2)
    steps = []
    report = T.train_teacher("tiny-llava", tmp_path / "m", cfg, spec=spec,
                             callbacks=[lambda e: steps.append((e.get("stage"), e.get("step")))],
                             progress=False)
    # Resumed in stage 2 at step 2: no stage-1 step runs again, stage 2 ends at its cap.
    assert not [s for s in steps if s[0] == 1]
    assert [s for s in steps if s[0] == 2] == [(2, 3), (2, 4)]
    assert report["steps"] == 4


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="stage3_seconds"):
        T.TeacherConfig.from_dict({"stage3_seconds": 1}, where="params.yaml: base")
    assert np.isclose(T.TeacherConfig.from_dict({"stage2_lr": 1e-3}).stage2_lr, 1e-3)


FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "teacher-tiny-llava"


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="fixture teacher not present")
def test_fixture_teacher_really_looks():
    """The committed tiny-llava teacher answers from the image, and 10% sampling hurts it."""
    model, processor = zoo.load(FIXTURE)
    report = T.evaluate(model, processor, WORLD, n_dialogues=30, seed=10_000)
    # 90 questions: 0.80 leaves ~3 standard errors below the 0.9 measured on 300 dialogues.
    assert report["acc_avg"] >= 0.80
    # Blind guessing is near majority chance; margins of 0.15 cover 90-question noise.
    assert report["acc_blank_image"] <= report["chance"] + 0.15
    assert report["acc_sample_r0.9"] <= report["acc_avg"] - 0.25


def test_arch_overrides_apply_to_their_arch_only():
    cfg = T.TeacherConfig.from_dict({"stage2_batch": 20,
                                     "arch_overrides": {"tiny-llava-next": {"stage2_batch": 8}}})
    assert cfg.for_arch("tiny-llava-next").stage2_batch == 8
    assert cfg.for_arch("tiny-llava").stage2_batch == 20
    with pytest.raises(ValueError, match="arch_overrides.tiny-llava: unknown keys"):
        T.TeacherConfig.from_dict({"arch_overrides": {"tiny-llava": {"lr": 1}}})
