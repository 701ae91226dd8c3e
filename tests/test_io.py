"""mc_core.io: atomic files and folders, rollback, permission policy, disk-full messages."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from mc_core import io


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_json_publishes_whole_file_with_shared_mode(tmp_path):
    target = tmp_path / "sub" / "r.json"
    io.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert _mode(target) == 0o644 & ~mask  # mkstemp alone would leave 0o600
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]  # no temp left behind


def test_staged_file_failure_keeps_previous_version(tmp_path):
    target = tmp_path / "r.txt"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError), io.staged_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_staged_dir_replaces_and_rolls_back(tmp_path):
    target = tmp_path / "ckpt"
    with io.staged_dir(target) as d:
        (d / "w.bin").write_bytes(b"1")
    assert (target / "w.bin").read_bytes() == b"1"
    with pytest.raises(ValueError), io.staged_dir(target) as d:
        (d / "w.bin").write_bytes(b"2")
        raise ValueError("bad")
    assert (target / "w.bin").read_bytes() == b"1"
    with io.staged_dir(target) as d:
        (d / "x.bin").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["x.bin"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing aside left


def test_replace_dir_puts_old_back_when_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    io.write_text(target / "a", "old")
    staged = tmp_path / "new"
    staged.mkdir()
    calls = []
    real = io._move

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the swap itself fails, after the old folder moved aside
            raise OSError(errno.EIO, "boom")
        real(src, dst)

    monkeypatch.setattr(io, "_move", flaky)
    with pytest.raises(OSError):
        io.replace_dir(staged, target)
    assert (target / "a").read_text() == "old"


def test_disk_full_names_target_and_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    io.write_json(target, {"v": 1})

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_move", full)
    with pytest.raises(OSError) as info:
        io.write_json(target, {"v": 2})
    assert str(target) in str(info.value) and "free" in str(info.value).lower()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
