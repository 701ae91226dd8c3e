"""The fault registry, the trial loop and the reports (``reports/reliability.{json,md}``).

A fault is a function ``fn(ctx, trial) -> Trial``: it injects one failure into a clone of the
reference workspace (or into the library directly), then checks what the issue asks of the
pipeline. A trial *survives* when it ends in a completed rerun or a clear error (naming what
failed and what to do) with every earlier output intact; it *loses* when any committed output,
checkpoint, registry version or run record was lost or corrupted. Anything else (an unclear
error, a hang) is neither: ``tried - survived`` then says the fault was not handled.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reliability import workspace as W

KINDS = ("kill", "corrupt", "bad-input", "concurrency", "outage", "disk", "security")


@dataclass
class Trial:
    """One trial's verdict and a one-line account of what happened."""

    survived: bool
    lost: bool
    how: str


@dataclass
class Fault:
    """A registered fault: its name, kind, what it does (``doc``) and whether CI runs it."""

    name: str
    kind: str
    fn: Callable[[Context, int], Trial]
    doc: str
    ci: bool = False
    needs_reference: bool = True
    variants: int = 1  # trials that differ by design (trial index picks the variant)


FAULTS: dict[str, Fault] = {}


def fault(name: str, kind: str, *, ci: bool = False, reference: bool = True, variants: int = 1):
    """Register ``fn`` as fault ``name`` of ``kind`` (its docstring's first line is its ``how``).

    ``ci``: part of the subset tests/test_faults.py runs; ``reference``: needs the reference
    workspace (otherwise it runs on the library or the source alone); ``variants``: its
    default number of trials when they are not repeated at random.
    """
    if kind not in KINDS:
        raise ValueError(f"fault {name!r}: kind {kind!r} is not one of {KINDS}")

    def wrap(fn):
        doc = " ".join((fn.__doc__ or "").split())
        FAULTS[name] = Fault(
            name, kind, fn, doc, ci=ci, needs_reference=reference, variants=variants
        )
        return fn

    return wrap


@dataclass
class Context:
    """What trials share: a scratch folder, the reference workspace and its stage timings."""

    root: Path
    seed: int = 0
    ref: Path | None = None
    took: dict[str, float] = field(default_factory=dict)
    # Stages the reference runs a second time, forced (None: those the kill faults aim at).
    force: list[str] | None = None
    extra: dict | None = None  # params over workspace.SHRINK (tests: one rate)
    _n: int = 0
    _ref_error: str = ""

    def reference(self) -> Path:
        """The reference workspace (built on first use: one uninterrupted ``dvc repro``)."""
        if self.ref is None:
            t0 = time.monotonic()
            ref = self.root / "reference"
            if self._ref_error:  # built once: a broken reference fails every trial fast
                raise RuntimeError(f"no reference workspace: {self._ref_error}")
            try:
                force = list(W.STAGES.values()) if self.force is None else self.force
                self.took = W.reference(ref, force=force, extra=self.extra)
            except Exception as err:
                self._ref_error = str(err)[-2000:]
                raise
            self.ref = ref
            print(
                f"faults: reference workspace {self.ref} in {time.monotonic() - t0:.0f} s",
                flush=True,
            )
        return self.ref

    def clone(self, tag: str) -> Path:
        """A fresh copy of the reference workspace for one trial."""
        self._n += 1
        return W.clone(self.reference(), self.root / f"{self._n:03d}-{tag}")

    def scratch(self, tag: str) -> Path:
        """An empty folder for one trial."""
        self._n += 1
        p = self.root / f"{self._n:03d}-{tag}"
        p.mkdir(parents=True)
        return p

    def rng(self, name: str, trial: int) -> random.Random:
        """A generator seeded by (seed, fault, trial): kill points are reproducible."""
        return random.Random(f"{self.seed}/{name}/{trial}")


def run_trial(ctx: Context, name: str, trial: int = 0) -> Trial:
    """One trial of fault ``name`` (exceptions propagate: for tests)."""
    return FAULTS[name].fn(ctx, trial)


def run_faults(
    names: list[str],
    trials: int | dict[str, int],
    *,
    root: Path | None = None,
    seed: int = 0,
    keep: bool = False,
    log=print,
) -> dict:
    """Run ``trials`` trials of each named fault; returns the reliability record."""
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="mc-faults-", dir=root))
    ctx = Context(tmp, seed=seed)
    rows = []
    try:
        for name in names:
            f = FAULTS[name]
            n = trials if isinstance(trials, int) else trials.get(name, 1)
            row = {
                "name": name,
                "kind": f.kind,
                "tried": 0,
                "survived": 0,
                "lost": 0,
                "how": f.doc,
                "trials": [],
            }
            for t in range(n):
                t0 = time.monotonic()
                try:
                    res = f.fn(ctx, t)
                except Exception as err:  # the harness or an unexpected failure: a finding
                    tb = traceback.format_exc(limit=3)
                    res = Trial(False, False, f"trial crashed: {type(err).__name__}: {err}\n{tb}")
                row["tried"] += 1
                row["survived"] += bool(res.survived and not res.lost)
                row["lost"] += bool(res.lost)
                row["trials"].append(res.how.replace(str(tmp), "<scratch>"))
                verdict = "lost" if res.lost else "survived" if res.survived else "NOT HANDLED"
                log(
                    f"faults: {name} #{t}: {verdict} ({time.monotonic() - t0:.0f} s): "
                    f"{res.how[:400]}"
                )
            rows.append(row)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "faults": rows,
        "seed": seed,
        "config": {
            "arch": W.ARCH,
            "rates": list(W.RATES),
            "params": "smoke profile + reliability.workspace.SHRINK",
        },
    }


def merge(old: dict, new: dict) -> dict:
    """``old``'s rows with those of ``new`` replacing same-named ones (a partial rerun)."""
    by = {r["name"]: r for r in old.get("faults", [])}
    by.update({r["name"]: r for r in new["faults"]})
    order = list(FAULTS) + [n for n in by if n not in FAULTS]
    return {**new, "faults": [by[n] for n in order if n in by]}


def write_reports(record: dict, out_dir: Path) -> tuple[Path, Path]:
    """``reliability.json`` and ``reliability.md`` in ``out_dir`` (atomically)."""
    from mc_core import io

    out_dir = Path(out_dir)
    j = io.write_json(out_dir / "reliability.json", record)
    m = io.write_text(out_dir / "reliability.md", markdown(record))
    return j, m


def markdown(record: dict) -> str:
    """The table of faults, then each trial's account."""
    rows = record["faults"]
    kinds = sorted({r["kind"] for r in rows})
    ok = all(r["survived"] == r["tried"] and r["lost"] == 0 for r in rows)
    lines = [
        "# Reliability: fault injection",
        "",
        f"`python -m reliability` ({len(rows)} faults of {len(kinds)} kinds, seed "
        f"{record.get('seed', 0)}) on {record['config']['params']}, "
        f"{record['config']['arch']} at rates {record['config']['rates']}. "
        "Survived: a completed rerun or a clear error with every earlier output intact. "
        "Lost: a committed output, checkpoint, registry version or run record lost or "
        f"corrupted. All survived, none lost: **{'yes' if ok else 'NO'}**.",
        "",
        "| fault | kind | tried | survived | lost | how |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        how = r["how"].replace("|", "\\|")
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['tried']} | {r['survived']} | {r['lost']} | {how} |"
        )
    lines += ["", "## Trials", ""]
    for r in rows:
        lines.append(f"- **{r['name']}**")
        for i, t in enumerate(r.get("trials", [])):
            lines.append(f"  {i + 1}. {' '.join(t.split())}")
    return "\n".join(lines) + "\n"


def load(path: Path) -> dict:
    """A previous reliability record ({} when none)."""
    return json.loads(path.read_text()) if path.is_file() else {}
