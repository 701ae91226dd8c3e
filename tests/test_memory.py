"""mc_core.training.memory: the estimate against what autograd keeps on a tiny model, exact weights,
linear scaling, and 7B shapes from configs (meta device, no memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_llava
from test_train import tiny_dataset

from mc_core.compressors import build
from mc_core.models.families import adapter_for
from mc_core.training import memory
from mc_core.training.loop import student_logits
from mc_core.training.losses import total_loss
from mc_core.training.targets import batch_target as _batch_target
from mc_core.training.targets import build_target_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model, processor = build_llava()
    data = tiny_dataset(4)
    cache = build_target_cache(model, processor, data, batch_size=4, progress=False, device="cpu")
    return model, cache


def _saved_bytes(model, comp, entries) -> tuple[int, int, int]:
    """Bytes of the distinct storages autograd saves for one step's backward (weights
    excluded: they are counted once as weights), the padded length and answers per dialogue."""
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *comp.parameters()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, ps = student_logits(
            model, adapter_for(model), comp, entries, pad_token_id=0, device=torch.device("cpu")
        )
        total_loss(_batch_target(entries, "cpu"), logits.float(), ps)
    n, m = entries[0].tokens[0].shape[0], comp.kept(entries[0].tokens[0].shape[0])
    return sum(seen.values()), max(e.length for e in entries) - n + m, logits.shape[0]


@pytest.mark.parametrize("batch", [2, 4])
def test_estimate_matches_what_autograd_keeps(setup, batch):
    model, cache = setup
    comp = build("metacompress", rate=0.75, dim=64, d_c=16, seed=0).train()
    measured, seq, answers = _saved_bytes(model, comp, cache.entries[:batch])
    est = memory.estimate(
        model,
        batch_size=batch,
        seq_len=seq,
        answer_tokens=answers // batch,
        dtype="float32",
        generator_params=sum(p.numel() for p in comp.parameters()),
        visual_tokens=(64, 16),
    )
    # the generator's parameters, gradients and momentum are not saved activations
    params = sum(p.numel() for p in comp.parameters())
    kept = est["activations"] + est["logits"] + est["generator"] - 3 * 4 * params
    # Measured 1.11x (batch 2: no padding, so SDPA takes GQA keys unrepeated and no mask) and
    # 0.97x (batch 4, padded); the estimate models the padded GQA case of real batches.
    assert 0.8 < kept / measured < 1.25, (kept, measured)


def test_weights_are_the_parameter_bytes_exactly(setup):
    model, _ = setup

    def expected(size: int) -> int:  # floating tensors at the target dtype, int buffers as is
        total = sum(p.numel() * size for p in model.parameters())
        for b in model.buffers():
            total += b.numel() * (size if b.is_floating_point() else b.element_size())
        return total

    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        est = memory.estimate(model, batch_size=1, seq_len=10, answer_tokens=2, dtype=dtype)
        assert est["weights"] == expected(size)


def test_activations_scale_with_batch_and_length(setup):
    model, _ = setup

    def act(batch, seq):
        return memory.estimate(model, batch_size=batch, seq_len=seq, answer_tokens=6)["activations"]

    assert act(4, 100) == 2 * act(2, 100)  # linear in the batch
    # linear in L per token, plus the padded batch's L x L mask per layer (quadratic)
    layers, b = 2, 2
    assert act(2, 200) - 2 * act(2, 100) == layers * 2 * b * (200**2 - 2 * 100**2)
    with pytest.raises(ValueError, match="batch_size=0"):
        memory.estimate(model, batch_size=0, seq_len=10, answer_tokens=1)


def test_7b_shapes_from_config():
    from bench import shapes

    cfg = shapes.build_config(shapes.get_arch("llava-1.5-7b"), "real")
    est = memory.estimate(cfg, batch_size=36, seq_len=171, answer_tokens=6, dtype="bfloat16")
    assert 7.0e9 * 2 < est["weights"] < 7.1e9 * 2  # LLaVA-1.5-7B: 7.06 B parameters in bf16
    # 32 layers x (8 h + 8 h + 6 I + 4 heads + 2 L) bytes per token, h 4096, I 11008
    assert est["per_token_layer"]["mlp"] == 3 * 2 * 11008
    assert est["activations"] > 20 * 1024**3  # the paper's batch of 36 on one GPU: > 20 GiB
