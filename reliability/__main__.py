"""``python -m reliability``: run the fault-injection suite, write reports/reliability.*."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reliability import core, load_all


def main(argv: list[str] | None = None) -> int:
    """Run the chosen faults; exit 1 unless every trial survived and none lost anything."""
    load_all()
    ap = argparse.ArgumentParser(prog="python -m reliability", description=__doc__)
    ap.add_argument(
        "--faults",
        nargs="*",
        default=None,
        metavar="NAME",
        help=f"faults to run (default: all): {', '.join(core.FAULTS)}",
    )
    ap.add_argument(
        "--kinds",
        nargs="*",
        default=None,
        choices=core.KINDS,
        help="run only the faults of these kinds",
    )
    ap.add_argument(
        "--trials",
        type=int,
        default=3,
        help="trials per fault for kill, outage and concurrency faults (the others "
        "are deterministic: one trial per variant)",
    )
    ap.add_argument("--ci", action="store_true", help="only the CI subset, one trial each")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("reports"),
        help="folder of reliability.json / .md (default reports/)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="replace only the rows of the faults run in an existing report",
    )
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the scratch folder")
    ap.add_argument("--keep", action="store_true", help="keep the scratch workspaces")
    ap.add_argument("--list", action="store_true", help="list the faults and exit")
    a = ap.parse_args(argv)
    if a.list:
        for f in core.FAULTS.values():
            print(f"{f.name:28s} {f.kind:12s} {'ci ' if f.ci else '   '}{f.doc}")
        return 0
    names = a.faults or [
        f.name
        for f in core.FAULTS.values()
        if (not a.ci or f.ci) and (not a.kinds or f.kind in a.kinds)
    ]
    repeat = ("kill", "outage", "concurrency")
    trials = {
        n: 1 if a.ci else a.trials if core.FAULTS[n].kind in repeat else core.FAULTS[n].variants
        for n in names
        if n in core.FAULTS
    }
    record = core.run_faults(names, trials, root=a.tmp, seed=a.seed, keep=a.keep)
    if a.merge:
        record = core.merge(core.load(a.out / "reliability.json"), record)
    j, m = core.write_reports(record, a.out)
    print(core.markdown(record).split("\n## Trials")[0])
    print(f"wrote {j} and {m}")
    ok = all(r["survived"] == r["tried"] and r["lost"] == 0 for r in record["faults"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
