"""Stage ``report``: the summary table and plots over every cell of the grid.

Reads ``reports/eval/<cell>.json`` and ``reports/registry/<cell>.json`` for the cells of
``grid``; writes ``reports/summary.md`` (the table printed at the end of ``make run``),
``reports/summary.json`` (a DVC metric: per cell and method, average accuracy and KL),
``reports/summary.csv`` (a DVC plot) and ``reports/plots/*.png`` (``mc_core.plots``: accuracy
vs. rate per arch; per-turn accuracy per cell, where prompt-dependent pruning fails turns 2-3).

Usage: ``python -m tasks.report`` (stage) or ``python -m tasks.report --show`` (print the
existing summary and where to look next; what ``make run`` ends with).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mc_core import config
from tasks import common

PARAMS = ("grid", "report")
SUMMARY_MD = Path("reports/summary.md")
PLOTS = Path("reports/plots")


def collect(grid: config.GridParams) -> list[dict]:
    """One record per cell: its eval metrics and registry entry (error names a missing file)."""
    cells = []
    for arch, rate in grid.cells():
        ev = common.cell_file("eval", arch, rate)
        if not ev.is_file():
            raise ValueError(f"{ev}: missing evaluation of cell {config.cell_key(arch, rate)} "
                             f"(run `dvc repro evaluate@{config.cell_key(arch, rate)}`)")
        reg = common.cell_file("registry", arch, rate)
        cells.append({"arch": arch, "rate": rate, "eval": json.loads(ev.read_text()),
                      "registry": json.loads(reg.read_text()) if reg.is_file() else None})
    return cells


def table(cells: list[dict], methods: list[str]) -> str:
    """Markdown: one row per cell, average accuracy per method, metacompress's turns and KL."""
    head = ["arch", "rate", "dataset", *methods, "mc turns 1/2/3", "mc KL", "registry"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        ms = c["eval"]["methods"]
        accs = [f"{ms[m]['acc_avg']:.3f}" if m in ms else "-" for m in methods]
        mc = ms.get("metacompress", {})
        turns = "/".join(f"{a:.2f}" for a in mc.get("acc_turn", []))
        kl = f"{mc['kl_to_full']:.4f}" if "kl_to_full" in mc else "-"
        reg = c["registry"]
        where = f"{reg['name']} v{reg['version']} (champion v{reg['champion']})" if reg else "-"
        lines.append("| " + " | ".join([c["arch"], config.format_rate(c["rate"]),
                                          str(c["eval"].get("dataset", "?")), *accs, turns, kl,
                                          where]) + " |")
    return "\n".join(lines) + "\n"


def plots(cells: list[dict], methods: list[str], dpi: int, out: Path) -> list[Path]:
    """Accuracy vs. rate (all archs) and per-turn accuracy per cell (``mc_core.plots``)."""
    from mc_core import plots as mplots

    reports = [c["eval"] for c in cells]
    written = [mplots.accuracy_vs_rate(reports, out / "acc-vs-rate.png",
                                       methods=[m for m in methods if m != mplots.REFERENCE],
                                       dpi=dpi)]
    for c in cells:
        present = [m for m in methods if m in c["eval"]["methods"]]
        written.append(mplots.accuracy_per_turn(
            c["eval"], out / f"turns-{config.cell_key(c['arch'], c['rate'])}.png",
            methods=present, dpi=dpi))
    return written


def where_next() -> str:
    """Pointers printed after the table."""
    mlflow = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    return (
        "Where to look next:\n"
        "  reports/summary.md, reports/plots/*.png   this table and the plots\n"
        "  dvc metrics show / dvc plots show          metrics and curves of every stage\n"
        f"  MLflow ({mlflow}): `make serve`, then http://127.0.0.1:5000 (runs + registry)\n"
        "  load a compressor: tasks.tracking.load_compressor("
        "'models:/metacompress-<arch>-r<rate>@champion')\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Write (stage) or print (--show) the summary."""
    ap = argparse.ArgumentParser(description="summary table and plots over the grid")
    ap.add_argument("--show", action="store_true", help="print the existing summary only")
    if ap.parse_args(argv).show:
        if not SUMMARY_MD.is_file():
            raise SystemExit(f"{SUMMARY_MD} not found: run `dvc repro` first")
        print(SUMMARY_MD.read_text() + "\n" + where_next())
        return
    p = common.load_params(PARAMS, who="tasks.report")
    cells = collect(p.grid)
    methods = list(p.report.methods)
    md = "# MetaCompress summary\n\nAccuracy averaged over the 3 turns, per method.\n\n"
    md += table(cells, methods)
    common.write_text(SUMMARY_MD, md)
    summary = {config.cell_key(c["arch"], c["rate"]): {
        m: {"acc_avg": v["acc_avg"], "kl_to_full": v["kl_to_full"]}
        for m, v in c["eval"]["methods"].items() if m in methods} for c in cells}
    common.write_json("reports/summary.json", summary)
    rows = [{"cell": config.cell_key(c["arch"], c["rate"]), "method": m,
             "acc_avg": c["eval"]["methods"][m]["acc_avg"]}
            for c in cells for m in methods if m in c["eval"]["methods"]]
    common.write_csv("reports/summary.csv", rows, ["cell", "method", "acc_avg"])
    tmp = common.fresh_dir(PLOTS)
    plots(cells, methods, p.report.dpi, tmp)
    common.publish_dir(tmp, PLOTS)
    print(f"report: wrote {SUMMARY_MD} and {PLOTS}/ ({len(cells)} cells); "
          "`python -m tasks.report --show` prints it", flush=True)


if __name__ == "__main__":
    main()
