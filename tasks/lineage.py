"""Lineage of the pipeline's outputs: git commit, DVC hashes, content hashes, file locks.

What a run or a registered version records about where it came from, and the cross-process
lock that serialises writers of one shared output (``mc_registry.locks.file_lock``, which the
registry's writers take too). No MLflow here (``tasks/tracking.py``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

from mc_registry.locks import file_lock

__all__ = ["checkpoint_hash", "dvc_hashes", "file_lock", "git_sha"]


def git_sha(root: str | Path | None = None) -> str:
    """HEAD's sha (``-dirty`` when tracked files changed), or ``"unknown"`` outside git."""
    root = str(root or Path.cwd())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def dvc_hashes(paths: list[str], lock: str | Path = "dvc.lock") -> dict[str, str]:
    """DVC's recorded hash of each of ``paths`` (an out of some stage in ``dvc.lock``).

    Returns ``{"dvc.<path>": md5}`` for the paths found (a stage run outside DVC has none).
    """
    lock = Path(lock)
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    found: dict[str, str] = {}
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") in paths and out.get("md5"):
                found[f"dvc.{out['path']}"] = out["md5"]
    return found


def checkpoint_hash(path: str | Path) -> str:
    """SHA-256 over the relative names and bytes of every file of a checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: checkpoint folder not found")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{path}: checkpoint folder is empty")
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()
