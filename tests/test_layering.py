"""The layering contract (.importlinter, `make lint`): it holds on the tree, and it catches an
upward import and an import cycle when one is added to a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = [
    "mc_core",
    "mc_registry",
    "tasks",
    "flows",
    "bench",
    "reliability",
    "mc_cli",
    "mc_lmms",
    "mc_vllm",
]

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(root: Path) -> subprocess.CompletedProcess:
    # The root goes first on the path, so the packages are read from there (a copy or the tree).
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(root / ".importlinter")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": str(LINT.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_every_contract():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_the_library_importing_the_pipeline_breaks_it(tree_copy: Path):
    with (tree_copy / "mc_core" / "runtime.py").open("a") as f:
        f.write("\nimport tasks.common  # a deliberate violation\n")
    out = _lint(tree_copy)
    assert out.returncode != 0
    assert "mc_core is not allowed to import tasks" in out.stdout
    assert "mc_core.runtime -> tasks.common" in out.stdout


def test_an_import_cycle_breaks_it(tree_copy: Path):
    # mc_core.io is imported by mc_core.training.state; the reverse closes a cycle (and goes
    # up the layers: io sits below training).
    with (tree_copy / "mc_core" / "io.py").open("a") as f:
        f.write("\nfrom mc_core.training import state  # a deliberate cycle\n")
    out = _lint(tree_copy)
    assert out.returncode != 0
    assert "No cycles are allowed in mc_core" in out.stdout
