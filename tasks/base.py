"""Stage ``base``: train one tiny base LVLM into a teacher on the synthetic world.

Usage: ``python -m tasks.base --arch NAME [--out models/base/NAME]
[--report reports/base/NAME.json]``

Reads the ``base`` (``mc_core.teacher.TeacherConfig``) and ``world``
(``mc_core.data.synthetic.WorldConfig``) sections through ``tasks.common.load_params``; the work
is ``mc_core.teacher.train_teacher``. Interrupted runs resume from the checkpoint beside
``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tasks import common

PARAMS = ("base", "world")


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, train, write the model and the report; returns the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None)
    ns = ap.parse_args(argv)

    from mc_core import teacher, zoo
    from mc_core.data.synthetic import WorldConfig

    if ns.arch not in zoo.TINY:
        raise ValueError(f"--arch={ns.arch!r}: choose one of {sorted(zoo.TINY)}")
    p = common.load_params(PARAMS, who="tasks.base")
    base = p.base
    cfg = (
        base
        if isinstance(base, teacher.TeacherConfig)
        else teacher.TeacherConfig.from_dict(base, where="base")
    )
    world = p.world
    if not isinstance(world, WorldConfig):
        world = WorldConfig.from_dict(world, where="world")
    out = Path(ns.out or f"models/base/{ns.arch}")
    report_path = Path(ns.report or f"reports/base/{ns.arch}.json")
    t0 = time.monotonic()
    report = teacher.train_teacher(ns.arch, out, cfg, world=world)
    teacher.write_report(report, report_path)
    # Wall time goes to the log only: the report is a metric file and must be reproducible.
    print(
        f"base: {ns.arch}: acc_avg={report['acc_avg']} blank={report['acc_blank_image']} "
        f"chance={report['chance']} sample_r0.9={report['acc_sample_r0.9']} "
        f"selector_packed_r0.9={report['acc_selector_packed_r0.9']} "
        f"in {time.monotonic() - t0:.0f} s -> {out}, {report_path}"
    )
    return report


if __name__ == "__main__":
    with common.stage("base"):
        main()
