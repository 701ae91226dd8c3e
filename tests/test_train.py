"""Training: resume is bit-identical, KL falls, divergence stops with a clear error."""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from conftest import build_llava, make_image

from mc_core.compressors import build
from mc_core.data.schema import FEATURES
from mc_core.models.families import adapter_for
from mc_core.training.loop import TrainConfig, _order, student_logits, train
from mc_core.training.losses import TopKTarget, answer_kl
from mc_core.training.targets import (
    build_target_cache,
    load_target_cache,
    save_target_cache,
    target_cache_info,
)

# One torch thread for this module (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


QUESTIONS = [
    "what colour is at row 1 col 2 ?",
    "how many red circle ?",
    "is there a blue square ?",
    "what shape is at row 0 col 3 ?",
]
ANSWERS = ["red", "green", "blue", "yes", "no", "2", "3", "circle"]


def tiny_dataset(n: int, *, sizes: list[tuple[int, int]] = ((64, 64),)) -> datasets.Dataset:
    """`n` dialogues of the schema on random images (sizes cycled), tiny-vocabulary words."""
    rows: dict[str, list] = {k: [] for k in FEATURES}
    for i in range(n):
        buf = io.BytesIO()
        h, w = sizes[i % len(sizes)]
        make_image(h, w, seed=100 + i).save(buf, format="PNG")
        qs = [QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(3)]
        ans = [ANSWERS[(3 * i + k) % len(ANSWERS)] for k in range(3)]
        rows["dialogue_id"].append(f"t{i}")
        rows["source"].append("synthetic")
        rows["image_id"].append(f"img{i}")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["questions"].append(qs)
        rows["answers"].append(ans)
        rows["answer_sets"].append([[a] for a in ans])
        rows["question_types"].append(["colour"] * 3)
        rows["targets"].append([""] * 3)
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def train_setup():
    """A tiny LLaVA, 8 dialogues and their full-vocabulary target cache."""
    model, processor = build_llava()
    data = tiny_dataset(8)
    # Full-vocabulary targets: the tests below read and edit them as [T, V] log-probs.
    cache = build_target_cache(model, processor, data, batch_size=8, progress=False, topk=None)
    return model, processor, data, cache


@pytest.fixture(scope="module")
def setup():
    return train_setup()


def _cfg(**kw) -> TrainConfig:
    base = dict(
        lr=0.5,
        momentum=0.9,
        grad_clip=1e-2,
        batch_size=4,
        epochs=2,
        compressor_kwargs={"d_c": 16},
        checkpoint_every=3,
        log_every=1,
        progress=False,
        device="cpu",
        target_topk=None,  # as the setup cache
    )
    return TrainConfig(**{**base, **kw})


def test_cache_holds_full_model_answer_logprobs(setup):
    model, processor, data, cache = setup
    assert len(cache) == len(data)
    e = cache.entries[0]
    # 3 turns x (one answer word + end of turn); log-probs normalise to 1 per row.
    assert e.target.shape == (6, model.config.text_config.vocab_size)
    torch.testing.assert_close(e.target.exp().sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    assert e.tokens[0].shape == (64, 64)  # n = 64 patches, d = 64


def test_resume_ends_bit_identical(setup, tmp_path):
    model, processor, data, cache = setup
    cfg = _cfg(epochs=3)  # 2 steps per epoch: 6 steps, the crash lands mid-run
    straight = train(cfg, model, processor, data, rate=0.75, out_dir=tmp_path / "a", cache=cache)

    class Crash(Exception):
        pass

    def crash_at_4(step, metrics):
        if step == 4:  # after step 4, before its (absent) checkpoint: the last one is step 3
            raise Crash

    with pytest.raises(Crash):
        train(
            cfg,
            model,
            processor,
            data,
            rate=0.75,
            out_dir=tmp_path / "b",
            cache=cache,
            callbacks=[crash_at_4],
        )
    seen = []
    resumed = train(
        cfg,
        model,
        processor,
        data,
        rate=0.75,
        out_dir=tmp_path / "b",
        cache=cache,
        callbacks=[lambda s, m: seen.append(s)],
    )
    assert seen == [4, 5, 6]  # resumed from the step-3 checkpoint
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    init = build("metacompress", rate=0.75, dim=64, d_c=16, seed=0)
    assert not torch.equal(init.w_q, straight.w_q.cpu())  # training moved the weights


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    model, processor, data, cache = setup
    train(_cfg(max_steps=1), model, processor, data, rate=0.75, out_dir=tmp_path, cache=cache)
    with pytest.raises(ValueError, match="lr"):
        train(
            _cfg(max_steps=2, lr=0.1),
            model,
            processor,
            data,
            rate=0.75,
            out_dir=tmp_path,
            cache=cache,
        )


def _kl(model, compressor, cache) -> float:
    adapter = adapter_for(model)
    with torch.no_grad():
        logits, _ = student_logits(
            model, adapter, compressor, cache.entries, pad_token_id=0, device=torch.device("cpu")
        )
    return float(answer_kl(torch.cat([e.target for e in cache.entries]), logits))


def test_kl_falls_and_beats_pooling(setup):
    """Full-batch, KL only, fixed seed: gradient descent on a fixed objective must lower it.

    On a random frozen model the full model is barely sensitive to which visual tokens are kept
    (KL ~1e-3), so the step size is far above the paper's lr 1e-3 / clip 1e-2 (tuned for 7B
    models over 20k dialogues); a trained tiny base model is the realistic check (tasks.train).
    """
    model, processor, data, cache = setup
    log = []
    cfg = _cfg(lr=20.0, grad_clip=None, batch_size=8, epochs=10, lambda_ent=0.0, lambda_col=0.0)
    comp = train(
        cfg,
        model,
        processor,
        data,
        rate=0.9,
        cache=cache,
        callbacks=[lambda s, m: log.append(m["kl"])],
    )
    assert len(log) == 10
    # Measured: 1.26e-3 -> 0.70e-3 over 10 steps; 0.8 leaves room for platform noise.
    assert log[-1] < 0.8 * log[0]
    pool = build("pool", rate=0.9, dim=64)
    assert _kl(model, comp, cache) < _kl(model, pool, cache)


def test_nan_loss_stops_with_advice(setup):
    model, processor, data, cache = setup
    bad = load_like(cache)
    for e in bad.entries:
        e.target = torch.full_like(e.target, float("nan"))
    with pytest.raises(RuntimeError, match="lower train.lr"):
        train(_cfg(max_steps=2), model, processor, data, rate=0.75, cache=bad)


def test_exploding_loss_stops_with_advice(setup):
    model, processor, data, cache = setup
    bad = load_like(cache)
    first = set(_order(len(data), 0, 0)[:4].tolist())
    for i, e in enumerate(bad.entries):
        if i not in first:  # from the second batch on, the target wants a token q rates ~0
            target = torch.full_like(e.target, -1e4)
            target[:, 3] = 0.0
            e.target = target
    # KL only: the first loss is the small true KL (~1e-3), the second ~-log q(token 3) >> 100x.
    cfg = _cfg(max_steps=2, lambda_ent=0.0, lambda_col=0.0)
    with pytest.raises(RuntimeError, match="exploded"):
        train(cfg, model, processor, data, rate=0.75, cache=bad)


def load_like(cache):
    """A deep copy of a cache (tensors cloned)."""
    import copy

    return copy.deepcopy(cache)


def test_identity_student_matches_full_model(setup, tmp_path):
    """P = I through the cached inputs (pixel stubs, right-padded batch, positions aligned
    from the end) reproduces the full model: KL ~ 0, also after a disk round trip."""
    model, _, _, cache = setup
    identity = build("none", rate=0.5, dim=64)
    save_target_cache(cache, tmp_path / "c")
    for c in (cache, load_target_cache(tmp_path / "c")):
        # Same float32 maths, other batch padding: measured ~1e-9; 1e-6 is far below the
        # ~1e-3 KL of any real compression of this model.
        assert abs(_kl(model, identity, c)) < 1e-6
    assert cache.entries[0].base["pixel_values"].stride() == (0, 0, 0, 0)  # no pixel memory


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_identity_student_other_families_mixed_sizes(tiny, family):
    """Images of different sizes give different n per dialogue in one right-padded batch."""
    model, processor = tiny(family)
    data = tiny_dataset(3, sizes=[(48, 48), (32, 64), (64, 40)])
    cache = build_target_cache(
        model, processor, data, batch_size=3, progress=False, device="cpu", topk=None
    )
    assert len({e.tokens[0].shape[0] for e in cache.entries}) > 1
    assert abs(_kl(model, build("none", rate=0.5, dim=64), cache)) < 1e-6  # as above
    assert _kl(model, build("sample", rate=0.5, dim=64), cache) > 1e-5


def test_cache_round_trip(setup, tmp_path):
    _, _, _, cache = setup
    save_target_cache(cache, tmp_path / "cache")
    save_target_cache(cache, tmp_path / "cache")  # overwrite in place
    back = load_target_cache(tmp_path / "cache")
    assert len(back) == len(cache)
    for a, b in zip(cache.entries, back.entries, strict=True):
        assert torch.equal(a.target, b.target) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.tokens[0], b.tokens[0]) and a.length == b.length
        assert a.contexts[0].grid == b.contexts[0].grid
        assert set(a.base) == set(b.base)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("grad_clip", -1.0),
        ("batch_size", 0),
        ("clip_mode", "max"),
        ("device", "tpu"),
        ("max_steps", 0),
        ("target_topk", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"train\.{field}={value!r}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "sample"}, r"train\.method='sample' is not trainable"),
        ({"method": "magic"}, r"train\.method='magic': unknown compressor"),
        ({"compressor_kwargs": {"dc": 8}}, r"train\.compressor_kwargs\.dc: not a keyword"),
        ({"epochs": 2.5}, r"train\.epochs=2\.5"),
        ({"lrr": 0.1}, r"train\.lrr: Extra inputs are not permitted"),
    ],
)
def test_method_and_kwargs_are_checked_before_training(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_compressor_kwargs_reach_the_compressor(setup):
    model, processor, data, cache = setup
    comp = train(
        _cfg(max_steps=1, seed=5, compressor_kwargs={"d_c": 8, "pos_scale": 0.5}),
        model,
        processor,
        data,
        rate=0.75,
        cache=cache,
    )
    assert comp.name == "metacompress" and comp.d_c == 8 and comp.pos_scale == 0.5
    assert comp.seed == 5  # train.seed reaches a method that takes one


def test_topk_cache_round_trip(setup, tmp_path):
    model, processor, data, full = setup
    cache = build_target_cache(model, processor, data, batch_size=8, progress=False, topk=8)
    assert cache.topk == 8
    save_target_cache(cache, tmp_path / "c", info={"k": 8})
    back = load_target_cache(tmp_path / "c", topk=8)
    assert back.topk == 8 and target_cache_info(tmp_path / "c") == {"k": 8}
    for a, b, f in zip(cache.entries, back.entries, full.entries, strict=True):
        t = b.target
        assert isinstance(t, TopKTarget) and t.values.shape == (6, 8)
        assert t.values.dtype == torch.float16 and t.index.dtype == torch.int32
        for name in ("values", "index", "tail"):
            assert torch.equal(getattr(a.target, name), getattr(t, name)), name
        # The top 8 of the full row, and the tail holds the rest of the mass.
        top, idx = f.target.topk(8, dim=-1)
        assert torch.equal(t.index.long(), idx)
        torch.testing.assert_close(t.values.float(), top, atol=4e-3, rtol=0)  # fp16 rounding
        mass = t.values.float().exp().sum(-1) + t.tail.exp()
        torch.testing.assert_close(mass, torch.ones(6), atol=2e-3, rtol=0)  # fp16 values


def test_cache_of_another_k_is_refused(setup, tmp_path):
    model, processor, data, full = setup
    cache = build_target_cache(model, processor, data, batch_size=8, progress=False, topk=8)
    save_target_cache(cache, tmp_path / "c")
    with pytest.raises(
        ValueError, match=r"built with target_topk=8, this run wants target_topk=16"
    ):
        load_target_cache(tmp_path / "c", topk=16)
    with pytest.raises(ValueError, match=r"target_topk=None; rebuild"):
        load_target_cache(tmp_path / "c", topk=None)
    for have, want in ((cache, 16), (cache, None), (full, 8)):
        with pytest.raises(ValueError, match=rf"train\.target_topk={want!r}; rebuild it"):
            train(
                _cfg(max_steps=1, target_topk=want), model, processor, data, rate=0.75, cache=have
            )
    with pytest.raises(ValueError, match=r"topk=0: expected an int >= 1"):
        build_target_cache(model, processor, data, progress=False, topk=0)


def test_topk_targets_train_as_well_as_full_ones(setup):
    """Same run as test_kl_falls_and_beats_pooling with top-32 targets; the full KL it reaches.

    The random test model's answer distributions are nearly flat over 46 tokens: the top 32
    leave 25% of the mass in the tail, a harder case than a trained one (docs/benchmarks.md:
    under 2e-4 beyond the top 8). Measured: full targets 6.20e-4, top-32 6.35e-4 (+2.4%) from
    1.50e-3 untrained; 10% is far below the gap to the untrained generator or to pooling (8.9e-4).
    """
    model, processor, data, full = setup
    topk = build_target_cache(model, processor, data, batch_size=8, progress=False, topk=32)
    cfg = dict(lr=20.0, grad_clip=None, batch_size=8, epochs=10, lambda_ent=0.0, lambda_col=0.0)
    with_full = train(_cfg(**cfg), model, processor, data, rate=0.9, cache=full)
    with_topk = train(_cfg(**cfg, target_topk=32), model, processor, data, rate=0.9, cache=topk)
    kl_full, kl_topk = _kl(model, with_full, full), _kl(model, with_topk, full)
    assert kl_topk < 1.1 * kl_full
    assert kl_topk < _kl(model, build("pool", rate=0.9, dim=64), full)
