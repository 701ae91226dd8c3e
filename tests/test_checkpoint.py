"""Checkpoint round trip, fingerprint mismatch errors, and corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

from mc_core.compressors import TokenContext, build
from mc_core.compressors.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_compressor,
    save_compressor,
)

DIM = 16


def trained_generator():
    comp = build("metacompress", rate=0.9, dim=DIM, d_c=8, seed=3)
    with torch.no_grad():  # stand-in for training: weights no init would give
        comp.w_q.add_(0.1 * torch.randn_like(comp.w_q))
        comp.beta.mul_(1.7)
    return comp


def test_round_trip_gives_the_same_p(tmp_path):
    comp = trained_generator()
    save_compressor(tmp_path / "ckpt", comp, meta={"family": "llava", "arch": "tiny-llava"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temp dirs left behind"
    doc = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert doc["method"] == "metacompress" and doc["rate"] == 0.9 and doc["dim"] == DIM
    assert doc["fingerprint"]["family"] == "llava" and doc["fingerprint"]["dim"] == DIM
    assert doc["fingerprint"]["generator"]["d_c"] == 8 and doc["meta"]["arch"] == "tiny-llava"

    loaded = load_compressor(tmp_path / "ckpt", expect={"family": "llava", "dim": DIM})
    x = torch.randn(100, DIM)
    ctx = TokenContext(grid=(10, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x, ctx)[1], comp(x, ctx)[1])
    assert torch.equal(loaded.w_q, comp.w_q) and not torch.equal(loaded.w_q, loaded.w_k)


def test_overwrite_and_heuristic_checkpoint(tmp_path):
    save_compressor(tmp_path / "c", trained_generator(), meta={"family": "llava"})
    save_compressor(tmp_path / "c", build("random", rate=0.5, dim=DIM, seed=9), meta={})
    loaded = load_compressor(tmp_path / "c")
    assert loaded.name == "random" and loaded.seed == 9 and loaded.rate == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_family_and_dim_mismatch_name_both_and_the_file(tmp_path):
    save_compressor(tmp_path / "ckpt", trained_generator(), meta={"family": "llava"})
    with pytest.raises(ValueError, match=r"compressor\.json.*family = 'llava'.*'qwen2_vl'"):
        load_compressor(tmp_path / "ckpt", expect={"family": "qwen2_vl", "dim": DIM})
    with pytest.raises(ValueError, match=r"compressor\.json.*dim = 16.*dim = 4096"):
        load_compressor(tmp_path / "ckpt", expect={"family": "llava", "dim": 4096})
    with pytest.raises(ValueError, match="no fingerprint entry 'vocab'"):
        load_compressor(tmp_path / "ckpt", expect={"vocab": 5})


def test_corrupt_and_missing_files_are_named(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_compressor(ckpt, trained_generator(), meta={"family": "llava"})
    weights = (ckpt / WEIGHTS_FILE).read_bytes()
    (ckpt / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"compressor\.safetensors are corrupt"):
        load_compressor(ckpt)
    (ckpt / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=r"compressor\.safetensors are missing"):
        load_compressor(ckpt)
    (ckpt / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"compressor\.json is unreadable"):
        load_compressor(ckpt)
    with pytest.raises(ValueError, match=r"compressor\.json is missing"):
        load_compressor(tmp_path / "nowhere")


def test_weights_of_another_shape_are_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_compressor(ckpt, trained_generator(), meta={"family": "llava"})
    doc = json.loads((ckpt / CONFIG_FILE).read_text())
    doc["config"]["d_c"] = 4  # config edited by hand, weights still d_c = 8
    (ckpt / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"compressor\.safetensors do not fit metacompress"):
        load_compressor(ckpt)


def test_meta_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="meta must be JSON"):
        save_compressor(tmp_path / "c", trained_generator(), meta={"x": object()})
    assert not any(tmp_path.iterdir()), "nothing half-written"
