"""DVC workspaces per profile, and the ``dvc repro -s`` calls the flow makes in them.

The ``default`` profile runs in the checkout itself (``params.yaml`` as committed). Any other
profile (``smoke``, ``full``) runs in ``<checkout>/runs/<profile>/``: a DVC project of its own
holding a snapshot of ``dvc.yaml``, ``tasks/``, ``mc_registry/`` and ``mc_core/`` and the
profile's ``params.yaml`` (``tasks.params.profile_params``), with its own ``dvc.lock``, cache
and outputs. So a smoke run never overwrites the default pipeline's models, and re-running a
profile is incremental like any DVC project. MLflow stays shared: every workspace logs to the
checkout's tracking URI.

Usage: ``python -m flows.workspace smoke`` prints the workspace path (creating or refreshing it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from flows import dag
from mc_core import io
from tasks import cells, params

CHECKOUT = Path(__file__).resolve().parents[1]
LOCK_PATTERNS = (
    "Unable to acquire lock",
    "is busy, it is being blocked by",
    "Lock file",
    "lock is held",
)
_CODE = ("dvc.yaml", "tasks", "mc_registry", "mc_core")


class DvcLockError(RuntimeError):
    """Another DVC process holds the repo or an output lock: safe to retry."""


class DvcStageError(RuntimeError):
    """A stage failed for a reason other than a lock."""


def tracking_env(checkout: Path) -> dict[str, str]:
    """Environment for stage processes: the venv first on PATH, MLflow at the checkout's db."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{checkout / 'mlflow.db'}")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _copy_code(src: Path, dst: Path) -> None:
    for name in _CODE:
        s, d = src / name, dst / name
        if not s.exists():  # a checkout without that part (tests' stand-in projects)
            continue
        if s.is_dir():
            with io.staged_dir(d) as tmp:
                shutil.copytree(
                    s,
                    tmp,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
        else:
            with io.staged_file(d) as tmp:
                shutil.copy2(s, tmp)


def _seed_teachers(checkout: Path, ws: Path, archs: list[str]) -> None:
    """Copy the checkout's trained teachers into a workspace that has none yet.

    The base stage reuses a teacher whose recorded recipe_sha matches the params (the smoke
    profile keeps the default base recipe), so a profile's workspace starts from the committed
    teachers instead of training its own (an hour per arch, or a few steps left at chance).
    Its ``models/base/<arch>`` is a persist output: DVC does not remove it before the stage.
    """
    for arch in archs:
        src, dst = checkout / "models" / "base" / arch, ws / "models" / "base" / arch
        if (src / "zoo.json").is_file() and not dst.exists():
            with io.staged_dir(dst) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)


def ensure(profile: str, checkout: str | Path = CHECKOUT, *, extra: dict | None = None) -> Path:
    """The workspace of ``profile`` (created or refreshed); validates its params first.

    ``default`` is the checkout itself (its params.yaml validated, never rewritten). Other
    profiles get ``runs/<profile>/`` with fresh code and ``params.yaml`` = the profile overlaid
    on the checkout's params.yaml (then ``extra``).
    """
    checkout = Path(checkout).resolve()
    params_file = checkout / params.DEFAULT_PATH
    if profile == "default":
        if extra:
            raise ValueError(
                "profile='default' runs params.yaml as is: edit it instead of "
                f"overriding {sorted(extra)}"
            )
        params.load(params_file)
        return checkout
    values = params.profile_params(profile, params.read_yaml(params_file), extra=extra)
    ws = checkout / "runs" / profile
    ws.mkdir(parents=True, exist_ok=True)
    # Keep the whole runs/ tree out of git without touching the checkout's .gitignore.
    io.write_text(checkout / "runs" / ".gitignore", "*\n")
    _copy_code(checkout, ws)
    _seed_teachers(checkout, ws, values["grid"]["archs"])
    params.dump_yaml(
        values,
        ws / params.DEFAULT_PATH,
        header=f"# Generated for profile {profile!r} by flows/workspace.py from "
        f"{params_file}; edits are overwritten.\n",
    )
    dvc_dir = ws / ".dvc"
    if not (dvc_dir / "config").is_file():
        dvc_dir.mkdir(exist_ok=True)
        # no_scm: a plain DVC project (git would see it as part of the checkout's repo).
        io.write_text(dvc_dir / "config", "[core]\n    no_scm = true\n    analytics = false\n")
    return ws


def dvc(
    args: list[str],
    workspace: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``workspace`` (output captured)."""
    exe = Path(sys.executable).parent / "dvc"
    cmd = [str(exe) if exe.exists() else "dvc", *args]
    return subprocess.run(
        cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=timeout
    )


def recovery_hint(output: str) -> str:
    """What to run when DVC's output says its own state is damaged ("" otherwise)."""
    if "dvc.lock" in output and ("is invalid" in output or "validation failed" in output):
        return (
            "\ndvc.lock is damaged: restore it (git checkout dvc.lock), or delete it and "
            "run dvc repro (unchanged stages are restored from DVC's caches)"
        )
    return ""


def stages(workspace: Path) -> list[str]:
    """Stage names of the workspace's dvc.yaml, as DVC expands them (matrix included)."""
    r = dvc(["stage", "list", "--name-only"], workspace)
    if r.returncode != 0:
        out = (r.stdout or "") + (r.stderr or "")
        raise DvcStageError(
            f"dvc stage list failed in {workspace}:\n{out[-2000:]}{recovery_hint(out)}"
        )
    return [s.strip() for s in r.stdout.splitlines() if s.strip()]


def repro_stage(
    stage: str, workspace: Path, *, env: dict[str, str] | None = None, force: bool = False
) -> str:
    """``dvc repro -s [-f] <stage>``; DvcLockError on a lock conflict (retry), else the output."""
    r = dvc(["repro", "-s", *(["-f"] if force else []), stage], workspace, env=env)
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        if any(p in out for p in LOCK_PATTERNS):
            raise DvcLockError(f"{stage}: DVC lock held by another process:\n{out[-800:]}")
        raise DvcStageError(
            f"dvc repro -s {stage} failed in {workspace} "
            f"(exit {r.returncode}):\n{out[-4000:]}{recovery_hint(out)}"
        )
    return out


def by_kind(names: list[str]) -> dict[str, list[str]]:
    """Stage names grouped by kind (``train@a-0.5`` -> ``train``), in DVC's order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(cells.split_stage(n)[0], []).append(n)
    return groups


def cell_keys(names: dict[str, list[str]], kinds: list[dag.Kind]) -> list[str]:
    """The cell keys (``<arch>-<rate>``) of the per-cell kinds' stages, in DVC's order."""
    keys: list[str] = []
    for kind in kinds:
        if kind.fanout == "cell":
            for n in names.get(kind.name, []):
                key = cells.split_stage(n)[1]
                if key not in keys:
                    keys.append(key)
    return keys


def select_cells(
    keys: list[str], grid: params.GridParams, archs: list[str] | None, rates: list[float] | None
) -> list[str]:
    """The cell keys to run: all, or those of ``archs`` x ``rates`` (each must be in the grid)."""
    for a in archs or []:
        if a not in grid.archs:
            raise ValueError(f"archs: {a!r} is not in grid.archs={grid.archs} of this profile")
    for r in rates or []:
        if float(r) not in grid.rates:
            raise ValueError(f"rates: {r!r} is not in grid.rates={grid.rates} of this profile")
    want = {cells.cell_key(a, r) for a in (archs or grid.archs) for r in (rates or grid.rates)}
    return [k for k in keys if k in want]


if __name__ == "__main__":
    print(ensure(sys.argv[1] if len(sys.argv) > 1 else "smoke"))
