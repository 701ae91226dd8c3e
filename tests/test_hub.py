"""mc_core.models.hub: real checkpoints resolved from a local folder or the Hugging Face cache,
pinned
by content, offline; and mc_core.models.zoo loading them back through a base-model folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mc_core.models import hub, zoo

LLAVA_CONFIG = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    # Never the network, never the user's caches.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("MC_CACHE", str(tmp_path / "mc-cache"))


def _folder(path: Path, config: dict | None = None, weights: bytes = b"w" * 1000) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or LLAVA_CONFIG))
    (path / "model.safetensors").write_bytes(weights)
    (path / "sub").mkdir()
    (path / "sub" / "extra.txt").write_text("x")
    (path / ".cache").mkdir()  # tool state (huggingface local_dir downloads): not the model
    (path / ".cache" / "state").write_text("ignored")
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_hub(root: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """The hub cache layout: blobs by hash, snapshot links to them, refs/main -> commit."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        # LFS files are stored under their SHA-256, small git files under a git sha1.
        blob = _sha(data) if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snap


def test_folder_record_has_no_machine_path_and_is_the_same_for_two_copies(tmp_path):
    a = _folder(tmp_path / "a" / "ckpt")
    b = tmp_path / "elsewhere" / "deeper" / "ckpt"
    shutil.copytree(a, b)
    ra, rb = hub.resolve(str(a)), hub.resolve(str(b))
    assert ra.kind == "folder" and ra.revision is None and ra.source == "ckpt"
    assert ra.family == "llava" and ra.model_class == "LlavaForConditionalGeneration"
    assert sorted(ra.files) == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert ra.files["model.safetensors"] == {"size": 1000, "sha256": _sha(b"w" * 1000)}
    text = json.dumps(ra.to_dict())
    assert str(tmp_path) not in text and "/a/" not in text
    # What the base stage writes is byte-identical for the two copies.
    zoo.save_resolved(ra.to_dict(), tmp_path / "base-a", arch="mine")
    zoo.save_resolved(rb.to_dict(), tmp_path / "base-b", arch="mine")
    for name in ("resolved.json", "zoo.json"):
        assert (tmp_path / "base-a" / name).read_bytes() == (
            tmp_path / "base-b" / name
        ).read_bytes()
        assert str(tmp_path) not in (tmp_path / "base-a" / name).read_text()


def test_folder_hashes_are_memoised_by_path_size_and_mtime(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "ckpt")
    calls = []
    real = hub._hash_file
    monkeypatch.setattr(hub, "_hash_file", lambda f: calls.append(Path(f).name) or real(f))
    first = hub.resolve(str(folder))
    assert sorted(calls) == ["config.json", "extra.txt", "model.safetensors"]
    calls.clear()
    assert hub.resolve(str(folder)).files == first.files and calls == []  # memo hit
    (folder / "model.safetensors").write_bytes(b"v" * 1000)  # same size, new mtime
    changed = hub.resolve(str(folder))
    assert calls == ["model.safetensors"]
    assert changed.files["model.safetensors"]["sha256"] == _sha(b"v" * 1000)
    assert (tmp_path / "mc-cache" / "hashes.json").is_file()


def test_hub_id_resolves_through_the_cache_without_rehashing_lfs_blobs(tmp_path, monkeypatch):
    commit = "a" * 40
    weights = b"weights" * 100
    _fake_hub(
        tmp_path / "hf",
        "org/tiny-llava-hf",
        commit,
        {"config.json": json.dumps(LLAVA_CONFIG).encode(), "model.safetensors": weights},
    )
    hashed = []
    real = hub._hash_file
    monkeypatch.setattr(hub, "_hash_file", lambda f: hashed.append(Path(f).name) or real(f))
    rec = hub.resolve("org/tiny-llava-hf")
    assert (rec.kind, rec.source, rec.revision, rec.family) == (
        "hub",
        "org/tiny-llava-hf",
        commit,
        "llava",
    )
    assert rec.files["model.safetensors"] == {"size": len(weights), "sha256": _sha(weights)}
    assert hashed == ["config.json"]  # the LFS blob's name is its SHA-256: not read again
    assert str(tmp_path) not in json.dumps(rec.to_dict())
    assert hub.resolve("org/tiny-llava-hf", revision=commit).files == rec.files
    assert hub.locate(rec.to_dict()) == rec.path
    # HF_HUB_CACHE wins over HF_HOME.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        hub.resolve("org/tiny-llava-hf")


def test_offline_miss_says_how_to_fetch(tmp_path):
    with pytest.raises(ValueError) as err:
        hub.resolve("org/not-cached", revision="v1")
    msg = str(err.value)
    assert "'org/not-cached'" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download org/not-cached --revision v1" in msg
    assert "huggingface-cli download org/not-cached" in msg


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: str(t / "missing" / "ckpt"), r"no such folder"),
        (lambda t: "./relative/missing", r"no such folder"),
        (lambda t: "a/b/c", r"no such folder"),
        (lambda t: (t / "empty").mkdir() or str(t / "empty"), r"config.json missing"),
        (
            lambda t: str(_folder(t / "bert", {"model_type": "bert"})),
            r"model_type='bert' belongs to no family",
        ),
    ],
)
def test_bad_sources_are_named(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        hub.resolve(make(tmp_path))


def test_revision_of_a_folder_is_refused(tmp_path):
    folder = _folder(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="revision='main' applies to hub ids"):
        hub.resolve(str(folder), revision="main")


def test_locate_refuses_changed_or_unknown_weights(tmp_path):
    folder = _folder(tmp_path / "ckpt")
    record = hub.resolve(str(folder)).to_dict()
    assert hub.locate(record) == folder.resolve()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match=r"changed since they were recorded \(model.safetensors\)"):
        hub.locate(record)
    (tmp_path / "mc-cache" / "locations.json").unlink()
    with pytest.raises(ValueError, match="not known on this machine"):
        hub.locate(record)


def test_zoo_loads_a_recorded_real_model_and_checks_it(tmp_path, hf_snapshot):
    from transformers import LlavaForConditionalGeneration

    src = tmp_path / "snap"
    shutil.copytree(hf_snapshot("llava"), src)
    rec = hub.resolve(str(src))
    out = zoo.save_resolved(rec.to_dict(), tmp_path / "models" / "base" / "mine", arch="mine")
    assert zoo.info(out)["family"] == "llava" and zoo.info(out)["arch"] == "mine"
    model, processor = zoo.load(out)
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert type(processor).__name__ == "LlavaProcessor"
    assert next(model.parameters()).dtype.is_floating_point
    # Weights replaced under the record: loading refuses rather than using other weights.
    os.remove(src / "model.safetensors")
    with pytest.raises(ValueError, match="changed since they were recorded"):
        zoo.load(out)
