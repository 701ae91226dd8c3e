"""One compressor for every rate (issue 27): a rate per call, training over rates, any-rate
checkpoints, and a rate per request in inference (engine, CLI, lmms-eval plugin)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import build_llava, make_image
from test_compressors import DIM, synthetic_context
from test_train import _cfg as _train_cfg
from test_train import tiny_dataset, train_setup

from mc_core.compressors import available, build
from mc_core.compressors.checkpoint import CONFIG_FILE, load_compressor, save_compressor
from mc_core.compressors.ops import kept_tokens
from mc_core.inference.conversation import Conversation
from mc_core.inference.engine import BatchConversation
from mc_core.models import zoo
from mc_core.runtime import token_dim
from mc_core.training import rates as step_rates
from mc_core.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

# Layouts with a grid (2-D pooling and E_pos) and without (1-D), odd sizes included.
CASES = [(576, (24, 24)), (101, None)]


def _built_like(comp, rate: float):
    """A compressor of the same method and settings built at ``rate``, with the same weights."""
    other = build(comp.name, rate=rate, dim=comp.dim, **comp.config())
    other.load_state_dict(comp.state_dict())
    return other


def _trained_like(name: str, rate: float, dim: int = DIM):
    comp = build(name, rate=rate, dim=dim)
    with torch.no_grad():  # weights away from the init, so "the same weights" means something
        g = torch.Generator().manual_seed(7)
        for p in comp.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return comp


# -- 1. a rate per call --------------------------------------------------------------------


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize(("n", "grid"), CASES)
def test_rate_per_call_equals_a_compressor_built_at_that_rate(name, n, grid):
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(n))
    ctx = synthetic_context(n, seed=1, grid=grid)
    comp = _trained_like(name, 0.5)
    for rate in (0.9, 0.75, 0.5, 0.9):  # back and forth: no cached table of another m leaks
        if name == "random":
            comp.reseed()  # the draws depend on how many calls came before, not on the rate
        y, P = comp(x, ctx, rate=rate)
        want_y, want_P = _built_like(comp, rate)(x, ctx)
        assert torch.equal(P, want_P), (name, rate)
        assert torch.equal(y, want_y), (name, rate)
    assert comp.rate == 0.5 and comp._call_rate is None  # the module is unchanged afterwards
    if name == "random":
        comp.reseed()
    assert torch.equal(comp(x, ctx)[1], _built_like(comp, 0.5)(x, ctx)[1])


@pytest.mark.parametrize("name", ["metacompress", "pool", "divprune"])
def test_a_rate_per_image_in_one_call(name):
    comp = _trained_like(name, 0.75)
    xs = [torch.randn(n, DIM, generator=torch.Generator().manual_seed(n)) for n in (64, 64, 50)]
    ctxs = [synthetic_context(64, grid=(8, 8)), synthetic_context(64, grid=(8, 8)), None]
    ys, ps = comp(xs, ctxs, rate=[0.5, 0.9, None])
    for x, c, r, y, p in zip(xs, ctxs, [0.5, 0.9, 0.75], ys, ps, strict=True):
        want_y, want_p = comp(x, c, rate=r)
        assert torch.equal(p, want_p) and torch.equal(y, want_y)
    assert [p.shape[0] for p in ps] == [32, 7, 13]


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        (1.5, r"metacompress rate \(per call\) must be in \(0, 1\).*got 1\.5"),
        (0.0, r"got 0\.0"),
        (float("nan"), r"got nan"),
        (True, r"got True"),
        ("0.5", r"got '0\.5'"),
        ([0.5, 0.5], r"a single token tensor takes one rate, got \[0\.5, 0\.5\]"),
    ],
)
def test_bad_rate_per_call_names_the_value(rate, message):
    comp = build("metacompress", rate=0.5, dim=DIM)
    with pytest.raises(ValueError, match=message):
        comp(torch.randn(10, DIM), rate=rate)
    assert comp._call_rate is None


def test_bad_rate_in_a_list_names_its_index():
    comp = build("sample", rate=0.5, dim=DIM)
    xs = [torch.randn(10, DIM), torch.randn(12, DIM)]
    with pytest.raises(ValueError, match=r"sample rate\[1\] \(per call\).*got 2\.0"):
        comp(xs, rate=[0.5, 2.0])
    with pytest.raises(ValueError, match="gives 1 rates for 2 token tensors"):
        comp(xs, rate=[0.5])


def test_an_error_inside_the_call_restores_the_rate():
    comp = build("prumerge", rate=0.5, dim=DIM)
    with pytest.raises(ValueError, match="needs TokenContext.cls_attention"):
        comp(torch.randn(10, DIM), rate=0.9)
    assert comp._call_rate is None and comp.kept(10) == 5


# -- 2. training over rates -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ([0.5], r"train\.rates=\[0\.5\]: expected \[lo, hi\]"),
        ([0.9, 0.5], r"train\.rates=\[0\.9, 0\.5\]: a range \[lo, hi\] needs lo < hi"),
        ([0.5, 0.75, 0.5], r"train\.rates=\[0\.5, 0\.75, 0\.5\]: .*distinct"),
        ([0.5, 1.0], r"train\.rates=\[0\.5, 1\.0\]: rates\[1\] must be in \(0, 1\).*got 1\.0"),
        ([], r"train\.rates=\[\]: expected \[lo, hi\]"),
        ("0.5", r"train\.rates='0\.5'"),
    ],
)
def test_train_rates_are_validated_naming_the_value(rates, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(rates=rates)


def test_default_fingerprint_is_unchanged_and_rates_enter_only_when_set():
    # The keys every single-rate checkpoint's "train" record and training-state key hold (the
    # default pipeline's checkpoints must stay byte-identical): rates must not be among them.
    expected = {
        "batch_size",
        "clip_mode",
        "compressor_kwargs",
        "dtype",
        "explode_factor",
        "grad_clip",
        "lambda_col",
        "lambda_ent",
        "lr",
        "method",
        "momentum",
        "seed",
        "target_topk",
        "targets",
    }
    assert set(TrainConfig().fingerprint()) == expected
    assert TrainConfig(rates=[0.5, 0.95]).fingerprint()["rates"] == [0.5, 0.95]


def test_step_rate_is_a_pure_function_of_seed_and_step():
    lo, hi = 0.5, 0.95
    draws = [step_rates.step_rate((lo, hi), 0, s) for s in range(400)]
    assert draws == [step_rates.step_rate((lo, hi), 0, s) for s in range(400)]
    assert all(lo <= r <= hi for r in draws)
    assert draws != [step_rates.step_rate((lo, hi), 1, s) for s in range(400)]  # seeded
    thirds = [
        sum(lo + k * (hi - lo) / 3 <= r < lo + (k + 1) * (hi - lo) / 3 for r in draws)
        for k in range(3)
    ]
    assert min(thirds) > 100  # uniform: ~133 each
    members = {step_rates.step_rate((0.5, 0.75, 0.9), 3, s) for s in range(100)}
    assert members == {0.5, 0.75, 0.9}
    assert step_rates.nominal_rate((0.5, 0.95)) == pytest.approx(0.725)
    assert step_rates.nominal_rate((0.9, 0.5, 0.75)) == 0.75
    assert step_rates.nominal_rate((0.9, 0.5, 0.75, 0.6)) == 0.6
    # micro_batch "auto" plans for the costliest step: the lowest rate keeps the most tokens
    assert step_rates.costliest_kept((0.9, 0.5, 0.75))(256) == 128


@pytest.fixture(scope="module")
def setup():
    return train_setup()


def _cfg(**kw) -> TrainConfig:
    """test_train's recipe, a step longer, over the rates [0.5, 0.9]."""
    return _train_cfg(**{"epochs": 3, "rates": [0.5, 0.9], **kw})


def test_training_over_rates_resumes_bit_identical(setup, tmp_path):
    model, processor, data, cache = setup
    seen: list[float] = []
    straight = train(
        _cfg(),
        model,
        processor,
        data,
        out_dir=tmp_path / "a",
        cache=cache,
        callbacks=[lambda s, m: seen.append(m["rate"])],
    )
    assert seen == [step_rates.step_rate((0.5, 0.9), 0, s) for s in range(6)]
    assert straight.rate == pytest.approx(0.7) and straight.trained_rates == (0.5, 0.9)

    class Crash(Exception):
        pass

    def crash_at_4(step, metrics):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        train(
            _cfg(),
            model,
            processor,
            data,
            out_dir=tmp_path / "b",
            cache=cache,
            callbacks=[crash_at_4],
        )
    rates_after: list[float] = []
    resumed = train(
        _cfg(),
        model,
        processor,
        data,
        out_dir=tmp_path / "b",
        cache=cache,
        callbacks=[lambda s, m: rates_after.append(m["rate"])],
    )
    assert rates_after == seen[3:]  # resumed from the step-3 checkpoint, same draws
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_training_rate_argument_with_rates(setup):
    model, processor, data, cache = setup
    with pytest.raises(ValueError, match=r"rate=0\.3: outside train\.rates=\[0\.5, 0\.9\]"):
        train(_cfg(max_steps=1), model, processor, data, rate=0.3, cache=cache)
    comp = train(_cfg(max_steps=1), model, processor, data, rate=0.6, cache=cache)
    assert comp.rate == 0.6 and comp.trained_rates == (0.5, 0.9)
    with pytest.raises(ValueError, match="train needs rate="):
        train(_cfg(max_steps=1, rates=None), model, processor, data, cache=cache)


# -- 3. checkpoints -------------------------------------------------------------------------


def test_any_rate_checkpoint_records_its_rates_and_old_ones_load_unchanged(tmp_path):
    import json

    comp = _trained_like("metacompress", 0.725)
    comp.trained_rates = (0.5, 0.95)
    save_compressor(tmp_path / "any", comp, meta={"family": "llava"})
    doc = json.loads((tmp_path / "any" / CONFIG_FILE).read_text())
    assert doc["rates"] == [0.5, 0.95] and doc["rate"] == 0.725
    back = load_compressor(tmp_path / "any")
    assert back.trained_rates == (0.5, 0.95) and back.rate == 0.725
    assert back.rate_span() == (0.5, 0.95) and back.serves(0.6) and not back.serves(0.97)
    x = torch.randn(64, DIM)
    assert torch.equal(back(x, rate=0.6)[1], comp(x, rate=0.6)[1])

    single = _trained_like("metacompress", 0.9)
    save_compressor(tmp_path / "one", single, meta={"family": "llava"})
    assert "rates" not in json.loads((tmp_path / "one" / CONFIG_FILE).read_text())
    old = load_compressor(tmp_path / "one")
    assert old.trained_rates is None and old.rate_span() == (0.9, 0.9)

    doc["rates"] = [0.9, 0.5]
    (tmp_path / "any" / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"compressor\.json: rates=\[0\.9, 0\.5\]: .*lo < hi"):
        load_compressor(tmp_path / "any")


# -- 4. a rate per request ------------------------------------------------------------------

QUESTIONS = [
    ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"],
    ["is there a red triangle in row 3 ?", "what colour ?", "how many blue circle are there ?"],
]
# The batched and single forwards run the same float32 maths in other matmul shapes (padding
# masked): measured ~1e-7 apart, as in tests/test_batching.py; 1e-5 leaves room for summation
# order only, not for another rate, position or cache row.
ATOL = 1e-5


@pytest.fixture(scope="module")
def any_rate(tmp_path_factory):
    """A tiny LLaVA and an any-rate checkpoint of it, loaded back (rates [0.5, 0.95])."""
    model, processor = build_llava()
    comp = _trained_like("metacompress", 0.725, token_dim(model))
    comp.trained_rates = (0.5, 0.95)
    path = tmp_path_factory.mktemp("anyrate") / "ckpt"
    save_compressor(path, comp, meta={"family": "llava"})
    return model, processor, path


def test_one_checkpoint_serves_two_rates_in_one_batch(any_rate):
    model, processor, path = any_rate
    comp = load_compressor(path)
    images = [make_image(64, 64, seed=1), make_image(64, 64, seed=2)]
    rates = [0.5, 0.9]
    batch = BatchConversation(model, processor, comp, images=images, rates=rates, max_new_tokens=3)
    answers = [batch.ask([q[k] for q in QUESTIONS]) for k in range(3)]
    for i, (img, rate) in enumerate(zip(images, rates, strict=True)):
        alone = Conversation(model, processor, comp, images=img, rate=rate, max_new_tokens=3)
        # and a compressor built at that rate with the same weights, no per-call rate at all
        built = Conversation(
            model, processor, _built_like(comp, rate), images=img, max_new_tokens=3
        )
        for k in range(3):
            a, b = alone.ask(QUESTIONS[i][k]), built.ask(QUESTIONS[i][k])
            assert answers[k][i] == a == b, (i, k)
            torch.testing.assert_close(
                batch.rows[i].first_logits[k], alone.first_logits[k], atol=ATOL, rtol=0
            )
            assert torch.equal(alone.first_logits[k], built.first_logits[k])
        row = batch.rows[i]
        assert row.rate == rate == alone.rate
        assert row.visual_tokens == alone.visual_tokens == [kept_tokens(64, rate)]
        assert torch.equal(row.P[0], alone.P[0])
        torch.testing.assert_close(row.tokens[0], alone.tokens[0], atol=ATOL, rtol=0)
        assert row.cache_tokens == alone.cache_tokens
    assert batch.rows[0].visual_tokens != batch.rows[1].visual_tokens  # 32 vs 7 tokens


def test_the_evaluator_runs_an_any_rate_compressor_at_the_asked_rate(any_rate):
    from mc_core.evaluation.runner import evaluate

    model, processor, path = any_rate
    comp = load_compressor(path)
    data = tiny_dataset(3)
    kw = dict(batch_size=2, max_new_tokens=3, progress=False, device="cpu")
    got = evaluate(model, processor, data, ["mc"], 0.6, compressors={"mc": comp}, **kw)
    want = evaluate(
        model, processor, data, ["mc"], 0.6, compressors={"mc": _built_like(comp, 0.6)}, **kw
    )
    for key in ("acc_dialogues", "kl_to_full", "visual_tokens"):
        assert got["methods"]["mc"][key] == want["methods"]["mc"][key], key
    assert got["methods"]["mc"]["visual_tokens"] == kept_tokens(64, 0.6)
    single = _built_like(comp, 0.9)  # a single-rate compressor is still refused elsewhere
    with pytest.raises(ValueError, match=r"built for rate 0\.9, evaluating rate 0\.6"):
        evaluate(model, processor, data, ["mc"], 0.6, compressors={"mc": single}, **kw)
    with pytest.raises(ValueError, match=r"trained over \[0\.5, 0\.95\]\), evaluating rate 0\.3"):
        evaluate(model, processor, data, ["mc"], 0.3, compressors={"mc": comp}, **kw)


def test_batch_rates_are_checked():
    model, processor = build_llava()
    comp = build("sample", rate=0.5, dim=token_dim(model))
    img = make_image(64, 64)
    with pytest.raises(ValueError, match=r"rates\[1\] must be in \(0, 1\).*got 1\.2"):
        BatchConversation(model, processor, comp, images=[img, img], rates=[0.5, 1.2])
    with pytest.raises(ValueError, match=r"rates=\[0\.5\]: expected one rate or 2"):
        BatchConversation(model, processor, comp, images=[img, img], rates=[0.5])


def test_cli_rate_runs_an_any_rate_checkpoint(any_rate, tmp_path, capsys):
    from mc_cli.main import main
    from mc_core.inference.embeds import load_embeds

    model, processor, path = any_rate
    folder = zoo.save(model, processor, tmp_path / "llava")
    image = tmp_path / "img.png"
    make_image(64, 64, seed=5).save(image)
    for rate, m in ((0.6, 26), (0.9, 7)):  # 64 tokens
        out = tmp_path / f"emb-{rate}.safetensors"
        argv = ["compress", image, "--model", folder, "--compressor", path, "--rate", rate]
        assert main([str(a) for a in [*argv, "-o", out]]) == 0
        emb = load_embeds(out)
        assert emb.m == m and emb.meta["compressor"] == f"metacompress@{rate}"
    chat = ["chat", image, "--model", folder, "--compressor", path, "-q", "how many ?"]
    code = main([str(a) for a in [*chat, "--rate", "0.9"]])
    assert code == 0 and "tokens kept 7/64" in capsys.readouterr().out
    code = main([str(a) for a in [*chat, "--rate", "0.3"]])
    err = capsys.readouterr().err
    assert code == 2 and "--rate 0.3" in err and "[0.5, 0.95]" in err


def test_lmms_rate_arg_reaches_every_conversation(any_rate, tmp_path, monkeypatch):
    from mc_lmms import loading

    model, processor, path = any_rate
    comp = loading.resolve_compressor(str(path), rate=0.8, model=model)
    assert comp.trained_rates == (0.5, 0.95)
    with pytest.raises(ValueError, match=r"model_args rate=0\.99: .*\[0\.5, 0\.95\]"):
        loading.resolve_compressor(str(path), rate=0.99, model=model)

    # The plugin itself imports lmms-eval (its own venv): stand in for the three names it uses.
    api = types.ModuleType("lmms_eval.api")
    instance = types.ModuleType("lmms_eval.api.instance")
    instance.GenerationResult = instance.TokenCounts = object
    base = types.ModuleType("lmms_eval.api.model")
    base.lmms = type("lmms", (), {"__init__": lambda self: None})
    loguru = types.ModuleType("loguru")
    loguru.logger = types.SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)
    for name, mod in {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": api,
        "lmms_eval.api.instance": instance,
        "lmms_eval.api.model": base,
        "loguru": loguru,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "mc_lmms.model", raising=False)
    from mc_lmms.model import MetaCompress

    folder = zoo.save(model, processor, tmp_path / "llava")
    plugin = MetaCompress(pretrained=str(folder), compressor=str(path), rate="0.8", device="cpu")
    image = make_image(64, 64, seed=3)
    conv = plugin._conversation([image], {"max_new_tokens": 3})
    want = Conversation(
        plugin.model,
        plugin.processor,
        _built_like(plugin.compressor, 0.8),
        images=image,
        max_new_tokens=3,
        instruction="",
    )
    assert conv.rate == 0.8 and conv.ask("how many ?") == want.ask("how many ?")
    assert conv.visual_tokens == want.visual_tokens == [13]
    monkeypatch.delitem(sys.modules, "mc_lmms.model", raising=False)
