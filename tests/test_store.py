"""The target store (``mc_core.training.store``): the target cache in shards on disk.

What must hold: a store holds exactly what the in-memory cache holds and training on it is the
same training; ``visual_tokens="recompute"`` gets the same tokens from the tower again; a build
that is killed resumes to the same bytes; a truncated shard or one of another store is refused
with an error naming it; reading does not keep entries in memory.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import build_family
from safetensors import safe_open
from test_train import tiny_dataset

from mc_core.training import targets
from mc_core.training.config import TrainConfig
from mc_core.training.loop import train
from mc_core.training.store import StoreWriter, TargetStore, shard_name
from mc_core.training.targets import build_target_cache, build_target_store, load_target_cache

pytestmark = pytest.mark.usefixtures("one_thread")

N, SHARD = 11, 4  # three shards: 4 + 4 + 3


@pytest.fixture(scope="module")
def setup():
    model, processor = build_family("llava")
    data = tiny_dataset(N, sizes=[(64, 64), (48, 80)])
    memory = build_target_cache(model, processor, data, batch_size=2, progress=False, device="cpu")
    return model, processor, data, memory


def _store(setup, path, **kw):
    model, processor, data, _ = setup
    kw = {"batch_size": 2, "progress": False, "device": "cpu", "shard_dialogues": SHARD, **kw}
    return build_target_store(model, processor, data, path, info={"data": "tiny"}, **kw)


def _same_entry(a, b, tokens=True):
    assert a.length == b.length and torch.equal(a.positions, b.positions)
    for name in ("values", "index", "tail"):
        assert torch.equal(getattr(a.target, name), getattr(b.target, name)), name
    if tokens:
        assert len(a.tokens) == len(b.tokens)
        assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    assert [c.grid for c in a.contexts] == [c.grid for c in b.contexts]
    assert set(a.base) == set(b.base)
    for k, v in a.base.items():
        assert v.shape == b.base[k].shape and v.dtype == b.base[k].dtype, k


def _cfg(**kw):
    base = dict(
        lr=0.5,
        momentum=0.9,
        grad_clip=1e-2,
        batch_size=4,
        max_steps=4,
        compressor_kwargs={"d_c": 16},
        progress=False,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def test_store_holds_what_memory_holds(setup, tmp_path):
    _, _, _, memory = setup
    store = _store(setup, tmp_path / "s")
    assert isinstance(store.entries, TargetStore) and len(store) == N
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*")) == [
        shard_name(k) for k in range(3)
    ]
    for i in range(N):
        _same_entry(memory.entries[i], store.entries[i])
        assert store.counts(i) == memory.counts(i) and store.shape(i) == memory.shape(i)
    half = store.step_shapes(lambda n: n // 2)
    assert half == memory.step_shapes(lambda n: n // 2)
    # One image of 64 tokens per dialogue: the longest compressed dialogue drops 32 of them.
    assert half["visual_tokens"] == (64, 32) and half["images"] == 1
    assert half["seq_len"] == max(memory.entries[i].length for i in range(N)) - 32


def test_training_on_a_store_is_training_in_memory(setup, tmp_path):
    model, processor, data, memory = setup
    store = _store(setup, tmp_path / "s")
    a = train(_cfg(), model, processor, data, rate=0.75, cache=memory)
    b = train(_cfg(), model, processor, data, rate=0.75, cache=store)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_recompute_gets_the_same_tokens_and_training(setup, tmp_path):
    model, processor, data, memory = setup
    lean = _store(setup, tmp_path / "r", visual_tokens="recompute")
    full_bytes = sum(f.stat().st_size for f in (tmp_path / "r").parent.glob("r/shard-*"))
    assert lean.visual_tokens == "recompute" and lean.entries[0].tokens == []
    _store(setup, tmp_path / "s")
    stored = sum(f.stat().st_size for f in (tmp_path / "s").glob("shard-*"))
    assert full_bytes < stored / 2  # the projector output is most of a store
    rows = targets.dataset_rows(data, [0, 5])
    entries = [lean.entries[0], lean.entries[5]]
    targets.recompute_tokens(model, processor, _adapter(model), entries, rows, "cpu")
    for e, i in zip(entries, (0, 5), strict=True):
        _same_entry(memory.entries[i], e)
    a = train(_cfg(), model, processor, data, rate=0.75, cache=memory)
    b = train(_cfg(visual_tokens="recompute"), model, processor, data, rate=0.75, cache=lean)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def _adapter(model):
    from mc_core.models.families import adapter_for

    return adapter_for(model)


def test_a_killed_build_resumes_to_the_same_bytes(setup, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    _store(setup, whole)
    real, calls = targets.frozen_entries, []

    def dies(*a, **k):  # killed while the second shard's second batch is computed
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(targets, "frozen_entries", dies)
    with pytest.raises(KeyboardInterrupt):
        _store(setup, tmp_path / "cut")
    assert (tmp_path / "cut" / shard_name(0)).is_file()
    assert not (tmp_path / "cut" / shard_name(1)).exists()
    with pytest.raises(ValueError, match="was not finished"):
        load_target_cache(tmp_path / "cut")
    monkeypatch.setattr(targets, "frozen_entries", real)
    calls.clear()
    counted = []
    monkeypatch.setattr(
        targets, "frozen_entries", lambda *a, **k: counted.append(1) or real(*a, **k)
    )
    _store(setup, tmp_path / "cut")
    assert len(counted) == 4  # shards 1 and 2 only (2 + 2 batches), shard 0 kept
    for k in range(3):  # same tensors and header (safetensors orders its header freely)
        a, b = (safe_open(str(d / shard_name(k)), "pt") for d in (whole, tmp_path / "cut"))
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (k, key)


def test_truncated_shard_is_named(setup, tmp_path):
    store_dir = tmp_path / "s"
    _store(setup, store_dir)
    shard = store_dir / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    store = load_target_cache(store_dir).entries
    store[0]  # shard 0 is intact
    with pytest.raises(ValueError, match=rf"{shard}: target store shard is \d+ bytes.*truncated"):
        store[5]


def test_shard_of_another_store_is_named(setup, tmp_path):
    _store(setup, tmp_path / "a")
    _store(setup, tmp_path / "b", topk=8)
    shutil.copy(tmp_path / "b" / shard_name(2), tmp_path / "a" / shard_name(2))
    # the manifest's size check would catch a different size first: equalise it
    store = load_target_cache(tmp_path / "a").entries
    rec = store.manifest["shards"][2]
    rec["bytes"] = (tmp_path / "a" / shard_name(2)).stat().st_size
    with pytest.raises(ValueError, match=rf"{shard_name(2)}: shard of another target store"):
        store[10]


def test_store_of_other_inputs_is_refused_not_overwritten(setup, tmp_path):
    _store(setup, tmp_path / "s")
    before = (tmp_path / "s" / "store.json").read_text()
    with pytest.raises(ValueError, match=r"a target store of other inputs .* delete the directory"):
        _store(setup, tmp_path / "s", topk=8)
    assert (tmp_path / "s" / "store.json").read_text() == before


def test_reading_keeps_no_entries(setup, tmp_path):
    store = _store(setup, tmp_path / "s").entries
    for i in range(N):
        store[i]
    assert len(store._open) <= 4 and not hasattr(store, "entries")
    assert store[-1].length == store[N - 1].length
    with pytest.raises(IndexError):
        store[N]


def test_writer_checks_the_count(tmp_path):
    w = StoreWriter(tmp_path / "s", {"x": 1}, n=3, shard_dialogues=2)
    with pytest.raises(ValueError, match="holds 0 dialogues, expected 3"):
        w.finish()


def test_bf16_tokens_are_stored_as_bf16(tmp_path):
    model, processor = build_family("llava")
    data = tiny_dataset(3)
    store = build_target_store(
        model,
        processor,
        data,
        tmp_path / "s",
        progress=False,
        device="cpu",
        dtype="bfloat16",
        shard_dialogues=2,
    )
    assert store.entries[0].tokens[0].dtype == torch.bfloat16
