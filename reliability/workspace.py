"""Temporary DVC workspaces for fault trials: a reference run, clones, stage commands, hashes.

A workspace is a git + DVC repository holding a copy of the project's pipeline (``dvc.yaml``,
``tasks/`` and the packages it imports: :func:`pipeline_packages`) and a ``params.yaml`` shrunk
to seconds per stage (the smoke profile with :data:`SHRINK` on top: one arch, two rates, a few
dialogues and steps, checkpoints every two steps so that a killed ``base`` or ``train`` has
something to resume from). The reference workspace runs ``dvc repro`` once, uninterrupted;
every trial works on a ``cp -a`` clone of it (DVC cache, run-cache, MLflow store and all), so a
trial costs only the stages it disturbs.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARCH = "tiny-llava"
RATES = (0.5, 0.9)
CELL = f"{ARCH}-0.5"
# The stages of the cell's pipeline by role (the ones kill faults aim at and the reference
# reruns forced, to time them alone), as DVC names them.
STAGES = {
    "prepare": "prepare",
    "base": f"base@{ARCH}",
    "train": f"train@{CELL}",
    "evaluate": f"evaluate@{CELL}",
    "register": f"register@{CELL}",
}
# The smoke profile shrunk further (as tests/test_pipeline_dvc.py does), with enough steps that
# a kill can land between checkpoints of base (2 stages x 10 steps) and train (40 steps).
SHRINK = {
    # The faults aim at the cells' stages: no any-rate compressor (the smoke profile has one).
    "grid": {"archs": [ARCH], "rates": list(RATES), "any_rate_archs": []},
    "data": {"train": {"dialogues": 4}, "val": {"dialogues": 4}, "test": {"dialogues": 2}},
    "base": {
        "train_images": 32,
        "eval_dialogues": 2,
        "curve_dialogues": 2,
        "stage1_steps": 10,
        "stage2_steps": 10,
        "stage3_steps": 0,
        "warmup_steps": 1,
        "stage1_batch": 2,
        "stage2_batch": 2,
        "checkpoint_every": 4,
    },
    "train": {
        "epochs": 20,
        "max_steps": 40,
        "batch_size": 2,
        "target_batch": 4,
        "shard_dialogues": 1,  # a target store of four shards: a kill can land between them
        "checkpoint_every": 5,
        "log_every": 1,
        "progress": False,
    },
    "evaluate": {
        "methods": ["none", "metacompress"],
        "val_methods": ["sample"],
        "max_dialogues": 2,
        "batch_size": 2,
        "progress": False,
        "ceilings": {"enabled": False},
    },
    "report": {"methods": ["none", "metacompress"]},
    # The default registry names (smoke registers its own, metacompress-smoke-...): the
    # workspace has its own MLflow store, and the registry faults address these names.
    "register": {"name_template": "metacompress-{arch}-r{rate}"},
}
# Output fields left out when outputs are compared: timings; the registry record's `created`
# (whether this call minted the version: a rerun after a kill between minting and writing the
# record finds the version instead, by design) and `run_id` (which of the runs that trained
# the same checkpoint bytes it links to; the versions' checkpoint hashes are compared instead).
VOLATILE = re.compile(r"(_s|_ms|per_s)$|^created$|^run_id$")
GIT_ID = {
    "GIT_AUTHOR_NAME": "faults",
    "GIT_AUTHOR_EMAIL": "faults@localhost",
    "GIT_COMMITTER_NAME": "faults",
    "GIT_COMMITTER_EMAIL": "faults@localhost",
}


def env(ws: Path, **extra: str) -> dict[str, str]:
    """Environment of a stage process in ``ws``: the venv first, MLflow at the workspace's db."""
    e = dict(os.environ)
    for k in (
        "MC_PARAMS",
        "MLFLOW_TRACKING_URI",
        "MC_FAULT_ENOSPC",
        "MC_FAULT_KILL_SAVE",
        "PYTHONPATH",
    ):
        e.pop(k, None)
    e.update(
        GIT_ID,
        PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MC_TORCH_THREADS="1",
    )
    e.update(extra)
    return e


def run(
    cmd: list[str], ws: Path, *, timeout: float = 900, **extra: str
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``ws`` (output captured, never raises on a non-zero exit)."""
    return subprocess.run(
        cmd, cwd=ws, env=env(ws, **extra), capture_output=True, text=True, timeout=timeout
    )


def dvc(ws: Path, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``ws``."""
    return run([str(BIN / "dvc"), *args], ws, timeout=timeout, **extra)


def python(ws: Path, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    """``python <args>`` in ``ws`` (the stage's own code: the workspace copy)."""
    return run([sys.executable, *args], ws, timeout=timeout, **extra)


def check(r: subprocess.CompletedProcess, what: str) -> str:
    """The output of a command that must succeed; RuntimeError with its tail otherwise."""
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}):\n{out[-3000:]}")
    return out


def ran(out: str) -> list[str]:
    """The stages a ``dvc repro`` output says it executed."""
    return re.findall(r"Running stage '([^']+)'", out)


def pipeline_packages(root: Path = ROOT) -> list[str]:
    """The checkout's packages a stage process imports: ``tasks`` and every top-level package
    of the checkout that its modules import, transitively (``mc_core``, ...), read from their
    ``import`` statements, so a workspace holds whatever code the stages need."""
    found: set[str] = set()
    todo = ["tasks"]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for f in sorted((root / name).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                todo += [m.split(".")[0] for m in mods]
        todo = [t for t in todo if t not in found and (root / t / "__init__.py").is_file()]
    return sorted(found)


def create(ws: Path, *, extra: dict | None = None) -> Path:
    """A fresh git + DVC workspace at ``ws`` with the project's pipeline and shrunk params."""
    from tasks import params as config

    ws.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, ws / name)
    for name in pipeline_packages():
        shutil.copytree(
            ROOT / name, ws / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    raw = config.read_yaml(ROOT / "params.yaml")
    values = config.profile_params("smoke", raw, extra=config._merge(SHRINK, extra or {}))
    config.dump_yaml(values, ws / "params.yaml")
    (ws / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/cache/\n__pycache__/\n")
    for cmd in (
        ["git", "init", "-q"],
        [str(BIN / "dvc"), "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        check(run(cmd, ws), " ".join(cmd[-2:]))
    return ws


def stages(ws: Path) -> list[str]:
    """The workspace's stage names in DVC's order (matrix expanded)."""
    out = check(dvc(ws, "stage", "list", "--name-only"), "dvc stage list")
    return [s.strip() for s in out.splitlines() if s.strip()]


def reference(
    ws: Path, force: list[str] | None = None, *, extra: dict | None = None
) -> dict[str, float]:
    """Create ``ws`` (``extra`` params over :data:`SHRINK`) and run every stage once, in order,
    then the ``force`` stages again (default: all); returns each stage's wall seconds (the
    forced rerun's, where forced)."""
    create(ws, extra=extra)
    took: dict[str, float] = {}
    for stage in stages(ws):
        t0 = time.monotonic()
        check(dvc(ws, "repro", "-s", stage), f"reference dvc repro -s {stage}")
        took[stage] = time.monotonic() - t0
    check(run(["git", "add", "-A"], ws), "git add")
    check(run(["git", "commit", "-qm", "reference run"], ws), "git commit")
    # Each stage again, forced: its duration when rerun alone (where kills are aimed), and a
    # check that the pipeline is deterministic (identical outputs), which kill trials rely on.
    want = snapshot(ws, all_outs(ws))
    for stage in list(took) if force is None else force:
        t0 = time.monotonic()
        check(dvc(ws, "repro", "-f", "-s", stage), f"reference dvc repro -f -s {stage}")
        took[stage] = time.monotonic() - t0
    diff = [p for p, h in snapshot(ws, all_outs(ws)).items() if want.get(p) != h]
    if diff:
        raise RuntimeError(f"the pipeline is not deterministic: rerun changed {diff}")
    # Stages downstream of the forced ones (their timing fields changed): up to date again.
    check(dvc(ws, "repro"), "reference dvc repro")
    check(run(["git", "add", "-A"], ws), "git add")
    check(run(["git", "commit", "-qm", "reference rerun", "--allow-empty"], ws), "git commit")
    status = check(dvc(ws, "status"), "dvc status")
    if "changed" in status:
        raise RuntimeError(f"the reference is not up to date after dvc repro:\n{status}")
    return took


def clone(ref: Path, dst: Path) -> Path:
    """A full copy of a workspace (git, DVC cache, MLflow store, outputs)."""
    shutil.copytree(ref, dst, symlinks=True)
    # The MLflow artifact locations are absolute: point the copy's at its own folder.
    db = dst / "mlflow.db"
    if db.is_file():
        import sqlite3

        with sqlite3.connect(db) as con:
            for table, col in (
                ("experiments", "artifact_location"),
                ("runs", "artifact_uri"),
                ("model_versions", "source"),
            ):
                con.execute(
                    f"UPDATE {table} SET {col} = replace({col}, ?, ?)", (str(ref), str(dst))
                )
    return dst


def lock_outs(ws: Path) -> dict[str, dict[str, str]]:
    """Per stage, ``{out path: md5}`` as recorded in the workspace's ``dvc.lock``."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text()) or {}
    return {
        name: {o["path"]: o.get("md5", "") for o in st.get("outs", []) or []}
        for name, st in (lock.get("stages") or {}).items()
    }


def forget(ws: Path, stage: str) -> None:
    """Make ``stage`` never-run in ``ws``: its ``dvc.lock`` entry and outputs removed, so the
    next ``dvc repro --no-run-cache`` really runs it (no checkout from DVC's caches)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    entry = lock["stages"].pop(stage)
    for o in entry.get("outs", []) or []:
        path = ws / o["path"]
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (ws / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def content(path: Path) -> str:
    """A digest of a file or folder's results: JSON without timing fields, CSV without timing
    columns, every other file byte for byte (names included for folders)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        data = f.read_bytes()
        if f.suffix == ".json":
            data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
        elif f.suffix == ".csv":
            lines = data.decode().splitlines()
            head = lines[0].split(",") if lines else []
            keep = [i for i, c in enumerate(head) if not VOLATILE.search(c)]
            data = "\n".join(
                ",".join(row.split(",")[i] for i in keep if i < len(row.split(",")))
                for row in lines
            ).encode()
        h.update(data)
    return h.hexdigest()


def snapshot(ws: Path, paths: list[str]) -> dict[str, str | None]:
    """``{path: content digest or None when absent}``."""
    return {p: content(ws / p) if (ws / p).exists() else None for p in paths}


def all_outs(ws: Path) -> list[str]:
    """Every output path the workspace's ``dvc.lock`` records."""
    return sorted({p for outs in lock_outs(ws).values() for p in outs})


def spawn(cmd: list[str], ws: Path, **extra: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a kill reaches every child); its output goes
    to a log file beside the workspace (``proc.log_path``), not a pipe that could fill up."""
    log = ws.parent / f"{ws.name}.{len(list(ws.parent.glob(ws.name + '.*.log')))}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=ws,
            env=env(ws, **extra),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log_path = log
    return proc


def kill9(proc: subprocess.Popen) -> str:
    """SIGKILL the process group of ``proc``; returns what it printed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    log = getattr(proc, "log_path", None)
    return log.read_text(errors="replace") if log else ""


def litter(ws: Path) -> list[str]:
    """Temporary siblings left by a killed writer (``mc_core.io``'s ``.name.tmp-*`` paths)."""
    skip = {".git", ".dvc", "mlartifacts"}
    found = []
    for p in ws.rglob(".*"):
        rel = p.relative_to(ws)
        if rel.parts[0] in skip:
            continue
        if re.search(r"\.(tmp-|old-)|\.tmp$", p.name):
            found.append(str(rel))
    return sorted(found)
