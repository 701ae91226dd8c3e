"""Gradient accumulation (``train.micro_batch``) and activation checkpointing
(``train.activation_checkpointing``): how a step is computed changes, its gradient does not.

A step of 36 dialogues run as one forward, as 4 micro-batches of 9 and as 5+5+...+5+1 must give
the same gradient: each micro-batch's KL is weighted by its share of the step's answer tokens
and its regularisers by its share of the images. Checkpointing recomputes the LLM's decoder
layers in the backward pass; the gradient is the same function evaluated again.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_family
from test_train import tiny_dataset

from mc_core.training.activations import checkpointed_layers
from mc_core.training.config import TrainConfig
from mc_core.training.loop import _Run, train
from mc_core.training.targets import build_target_cache

pytestmark = pytest.mark.usefixtures("one_thread")

N = 36


def _cfg(**kw) -> TrainConfig:
    base = dict(
        lr=0.5,
        momentum=0.0,
        grad_clip=None,
        batch_size=N,
        epochs=1,
        compressor_kwargs={"d_c": 16},
        progress=False,
        device="cpu",
        lambda_ent=0.1,
        lambda_col=0.1,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def setup():
    model, processor = build_family("llava")
    # Two image sizes: dialogues differ in answer tokens and padding, so equal weights per
    # micro-batch (instead of token shares) would give a different gradient.
    data = tiny_dataset(N, sizes=[(64, 64), (48, 80)])
    # Answers of one to three words: micro-batches hold different numbers of answer tokens.
    data = data.map(
        lambda r, i: {"answers": [" ".join([a] * (1 + i % 3)) for a in r["answers"]]},
        with_indices=True,
    )
    cache = build_target_cache(model, processor, data, batch_size=12, progress=False, device="cpu")
    return model, processor, data, cache


def _step_grads(setup, **kw) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    model, processor, data, cache = setup
    run = _Run.start(_cfg(**kw), model, processor, data, rate=0.75, cache=cache, adapter=None)
    idx = list(range(N))[::-1]  # not in cache order
    metrics = run.step(idx, 0, None)
    grads = {n: p.grad.clone() for n, p in run.compressor.named_parameters() if p.grad is not None}
    return grads, metrics


@pytest.mark.parametrize("micro", [9, 5, 1])
def test_micro_batches_give_the_gradient_of_one_batch(setup, micro):
    whole, m_whole = _step_grads(setup)
    parts, m_parts = _step_grads(setup, micro_batch=micro)
    assert whole.keys() == parts.keys() and whole
    for name, g in whole.items():
        # float32 sums in another order (per-chunk padding widths change the matmul shapes):
        # measured ~1e-8 relative; a missing token weighting is off by percents.
        torch.testing.assert_close(parts[name], g, rtol=1e-5, atol=1e-7, msg=name)
    for key in ("loss", "kl", "entropy", "collapse"):
        # The untrained KL is ~1e-3, a difference of nearly equal float32 log-probs: its
        # summation-order noise is absolute (measured 3e-9); a wrong weighting moves it ~1e-4.
        assert m_parts[key] == pytest.approx(m_whole[key], rel=1e-6, abs=1e-7), key


def test_equal_weights_per_micro_batch_would_differ(setup):
    """The token weighting matters here: the mean of the micro-batches' mean KLs is not the
    batch's mean KL, so the test above can tell a missing weighting."""
    model, processor, data, cache = setup
    counts = [cache.counts(i)[0] for i in range(N)][::-1]  # the step's order
    chunks = [sum(counts[i : i + 5]) / len(counts[i : i + 5]) for i in range(0, N, 5)]
    assert max(chunks) != min(chunks)


def test_whole_batch_as_micro_batch_is_bit_identical(setup):
    whole, m_whole = _step_grads(setup)
    same, m_same = _step_grads(setup, micro_batch=N)
    for name, g in whole.items():
        assert torch.equal(same[name], g), name
    assert m_same == m_whole


def _counting(model):
    calls = []
    # A layer's own hooks stay outside the checkpoint (transformers checkpoints `forward`), so
    # the recomputation is seen by its MLP's.
    layers = [m.mlp for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in layers]
    return calls, hooks, len(layers)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_checkpointing_recomputes_layers_and_keeps_the_gradient(family):
    model, processor = build_family(family)
    data = tiny_dataset(6, sizes=[(64, 64), (56, 84)])
    cache = build_target_cache(model, processor, data, batch_size=6, progress=False, device="cpu")
    grads = {}
    for ckpt in (False, True):
        run = _Run.start(
            _cfg(batch_size=6), model, processor, data, rate=0.5, cache=cache, adapter=None
        )
        calls, hooks, n_layers = _counting(model)
        with checkpointed_layers(model, ckpt) as n:
            assert n == (n_layers if ckpt else 0) and n_layers > 0
            run.step(list(range(6)), 0, None)
        for h in hooks:
            h.remove()
        # The decoder layers run once in the forward, and once more in the backward when
        # checkpointed (the recomputation: proof the memory is not kept).
        assert len(calls) == n_layers * (2 if ckpt else 1)
        grads[ckpt] = {n: p.grad.clone() for n, p in run.compressor.named_parameters()}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-6, atol=1e-8, msg=name)
    # The model is as it was: eval mode everywhere, checkpointing off.
    assert not any(m.training for m in model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_train_with_both_ends_like_train_without(setup, tmp_path):
    model, processor, data, cache = setup
    plain = train(_cfg(max_steps=2, batch_size=12), model, processor, data, rate=0.75, cache=cache)
    both = train(
        _cfg(max_steps=2, batch_size=12, micro_batch=5, activation_checkpointing=True),
        model,
        processor,
        data,
        rate=0.75,
        cache=cache,
    )
    for (name, a), b in zip(plain.state_dict().items(), both.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_auto_fits_the_budget(setup):
    from mc_core.training import memory
    from mc_core.training.loop import auto_micro_batch

    model, processor, data, cache = setup
    run = _Run.start(
        _cfg(micro_batch="auto"), model, processor, data, rate=0.75, cache=cache, adapter=None
    )
    assert run.micro == N  # CPU: no budget, the whole batch
    shapes = cache.step_shapes(run.compressor.kept)

    def peak(k):  # the estimate fit_micro_batch compares with the budget
        return memory.estimate(
            model,
            batch_size=k,
            seq_len=shapes["seq_len"],
            answer_tokens=shapes["answer_tokens"],
            dtype=torch.float32,
            images=k,
            visual_tokens=shapes["visual_tokens"],
            generator_params=sum(p.numel() for p in run.compressor.parameters()),
        )["total"]

    for want in (1, 7, N):
        cfg = _cfg(micro_batch="auto", max_memory_gib=peak(want) / 1024**3)
        k, est = auto_micro_batch(cfg, model, run.compressor, cache)
        assert k == want and est["total"] <= peak(want)
    with pytest.raises(ValueError, match="even a micro-batch of 1 needs"):
        auto_micro_batch(
            _cfg(micro_batch="auto", max_memory_gib=1e-6), model, run.compressor, cache
        )
