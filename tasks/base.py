"""Stage ``base@<arch>``: the base model of one arch, and how it uses the image on data/test.

Usage: ``python -m tasks.base --arch NAME [--out models/base/NAME]
[--report reports/base/NAME.json]``

- A tiny arch (``mc_core.models.zoo.TINY``) is trained into a teacher on the synthetic world
  (``mc_core.training.teacher.train_teacher``, the ``base`` and ``world`` sections), unless
  ``--out``
  already holds the teacher of the same recipe: ``zoo.json`` records ``recipe_sha``, the
  SHA-256 of ``{arch, the arch's TeacherConfig, world}``, and a match is reused
  (``MC_RETRAIN=1`` retrains). Interrupted training resumes from the checkpoint beside ``--out``.
- A real arch (a ``models`` name, or a ``zoo.REAL`` name) is not copied: its source (HF id
  through the Hugging Face cache, or a local folder) is resolved and pinned by content
  (``mc_core.models.hub``) into ``--out/resolved.json``; ``mc_core.models.zoo.load(--out)`` then
  loads those
  exact weights on this machine.

Either way the report measures the base model on ``data/test`` through ``mc_core.evaluation.runner``
(all tokens, a blank image, ``sample`` at 0.9, the packed ground-truth selector where the data
has object centres; the ``evaluate`` section's batch size, device and history), plus the
teacher's training summary (curve, steps, its own held-out world accuracies) for a tiny arch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tasks import cells, common, params

PARAMS = ("base", "world", "models", "evaluate")
RETRAIN_ENV = "MC_RETRAIN"  # set (1): train the tiny teacher even when its recipe matches
TEACHER_FILE = "teacher.json"  # beside a tiny teacher: its training summary, for reuse
REPORT_RATE = 0.9


def recipe_sha(arch: str, cfg, world) -> str:
    """SHA-256 of the canonical JSON of ``{arch, its TinySpec, cfg.for_arch(arch), world}``: what
    a tiny teacher's weights are a function of (budgets are steps and seeds). ``cfg`` is the
    ``base`` section (``tasks.params.BaseParams``: its ``arch_overrides`` applied for ``arch``)."""
    from mc_core.models import zoo

    recipe = {
        "arch": arch,
        # The architecture's sizes and image geometry: a spec edit changes the teacher too.
        "spec": dataclasses.asdict(zoo.TINY[arch]),
        "teacher": cfg.for_arch(arch).model_dump(mode="json"),
        "world": world.to_dict(),
    }
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _reusable(out: Path, sha: str) -> str | None:
    """Why the teacher at ``out`` cannot be reused (None: it can)."""
    if os.environ.get(RETRAIN_ENV, "").strip() not in ("", "0"):
        return f"{RETRAIN_ENV} is set"
    try:
        recorded = json.loads((out / "zoo.json").read_text()).get("recipe_sha")
    except (OSError, ValueError):
        return f"no teacher in {out}"
    if recorded != sha:
        return f"{out} holds recipe {str(recorded)[:12]}, the params give {sha[:12]}"
    if not (out / TEACHER_FILE).is_file():
        return f"{out / TEACHER_FILE} is missing"
    return None


def tiny_teacher(arch: str, out: Path, cfg, world) -> dict[str, Any]:
    """Train the tiny teacher into ``out``, or reuse the one there; its training summary."""
    from mc_core import io
    from mc_core.training import teacher

    sha = recipe_sha(arch, cfg, world)
    why = _reusable(out, sha)
    if why is None:
        print(
            f"base: {arch}: reusing the teacher in {out} (recipe_sha {sha[:12]} matches; "
            f"{RETRAIN_ENV}=1 retrains)",
            flush=True,
        )
        return json.loads((out / TEACHER_FILE).read_text())
    print(f"base: {arch}: training the teacher ({why})", flush=True)
    recipe = cfg.for_arch(arch)  # base.arch_overrides applied (tasks.params.overrides)
    report = teacher.train_teacher(arch, out, recipe, world=world, meta={"recipe_sha": sha})
    summary = {"recipe_sha": sha, "steps": report["steps"], "curve": report["curve"]}
    # The teacher's own held-out accuracies on freshly drawn world dialogues (teacher forced).
    summary["world_eval"] = {
        k: v for k, v in report.items() if k.startswith("acc") or k in ("chance", "n_dialogues")
    }
    # Written after zoo.save published the folder: a teacher is reused only with this file,
    # so a run killed in between trains again rather than reporting without a summary.
    io.write_json(out / TEACHER_FILE, summary)
    return summary


def real_model(arch: str, out: Path, source: params.ModelSource) -> dict[str, Any]:
    """Resolve and pin a real model's source into ``out`` (``resolved.json``, ``zoo.json``)."""
    from mc_core.models import hub, zoo

    rec = hub.resolve(source.source, source.revision)
    zoo.save_resolved(rec.to_dict(), out, arch=arch)
    size = sum(f["size"] for f in rec.files.values()) / 2**30
    at = f"@{rec.revision[:12]}" if rec.revision else ""
    print(
        f"base: {arch}: {rec.kind} {rec.source}{at} ({rec.family}, {len(rec.files)} files, "
        f"{size:.2f} GiB) pinned in {out / zoo.RESOLVED_FILE}",
        flush=True,
    )
    return {}


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, make or pin the base model, measure it; returns the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None)
    ns = ap.parse_args(argv)

    p = common.load_params(PARAMS, who="tasks.base")
    params.check_arch(ns.arch, p.models)

    from mc_core.data import schema
    from mc_core.evaluation.base_report import base_report
    from mc_core.models import zoo

    out = Path(ns.out or cells.base_dir(ns.arch))
    report_path = Path(ns.report or cells.report_file("base", ns.arch))
    t0 = time.monotonic()
    source = params.source_of(p.models, ns.arch)
    if source is None:
        extra = tiny_teacher(ns.arch, out, p.base, p.world)
    else:
        extra = real_model(ns.arch, out, source)
    facts = zoo.info(out)
    model, processor = zoo.load(out)
    ev = p.evaluate
    measured = base_report(
        model,
        processor,
        schema.load(common.DATA_TEST),
        rate=REPORT_RATE,
        max_dialogues=ev.max_dialogues,
        progress=ev.progress,
        **ev.run_kwargs(),
    )
    report = {
        "arch": ns.arch,
        "family": facts.get("family"),
        "source": facts.get("source"),
        "revision": facts.get("revision"),
        **measured,
        **extra,
    }
    common.write_json(report_path, report)
    # Wall time goes to the log only: the report is a metric file and must be reproducible.
    print(
        f"base: {ns.arch}: acc_avg={report['acc_avg']} blank={report['acc_blank_image']} "
        f"chance={report['chance']} sample_r0.9={report['acc_sample_r0.9']} "
        f"selector_packed_r0.9={report['acc_selector_packed_r0.9']} on "
        f"{report['n_dialogues']} test dialogues, in {time.monotonic() - t0:.0f} s "
        f"-> {out}, {report_path}",
        flush=True,
    )
    return report


if __name__ == "__main__":
    with common.stage("base"):
        main()
