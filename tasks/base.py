"""Stage ``base``: train one tiny base LVLM into a teacher on the synthetic world.

Usage: ``python -m tasks.base --arch NAME [--params params.yaml] [--out models/base/NAME]
[--report reports/base/NAME.json]``

Reads the ``base`` (``mc_core.teacher.TeacherConfig``) and ``world``
(``mc_core.data.synthetic.WorldConfig``) sections of the params file when present, else the
defaults; the work is ``mc_core.teacher.train_teacher``. Interrupted runs resume from the
checkpoint beside ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, train, write the model and the report; returns the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None)
    ns = ap.parse_args(argv)

    import yaml

    from mc_core import teacher, zoo
    from mc_core.data.synthetic import WorldConfig

    if ns.arch not in zoo.TINY:
        raise ValueError(f"--arch={ns.arch!r}: choose one of {sorted(zoo.TINY)}")
    params = {}
    if Path(ns.params).is_file():
        params = yaml.safe_load(Path(ns.params).read_text()) or {}
    cfg = teacher.TeacherConfig.from_dict(params.get("base"), where=f"{ns.params}: base")
    world = WorldConfig.from_dict(params.get("world"), where=f"{ns.params}: world")
    out = Path(ns.out or f"models/base/{ns.arch}")
    report_path = Path(ns.report or f"reports/base/{ns.arch}.json")
    report = teacher.train_teacher(ns.arch, out, cfg, world=world)
    teacher.write_report(report, report_path)
    print(f"base: {ns.arch}: acc_avg={report['acc_avg']} blank={report['acc_blank_image']} "
          f"chance={report['chance']} sample_r0.9={report['acc_sample_r0.9']} "
          f"train_seconds={report['train_seconds']} -> {out}, {report_path}")
    return report


if __name__ == "__main__":
    main()
