"""Stage ``report``: the summary table and plots over every cell of the grid.

Reads ``reports/eval/<cell>.json`` and ``reports/registry/<cell>.json`` for the cells of
``grid``, and ``reports/eval/<arch>-any.json`` for ``grid.any_rate_archs``
(``tasks.report_any``); writes ``reports/summary.md`` (the table printed at the end of
``make run``), ``reports/summary.json`` (a DVC metric: per cell and method, average accuracy
and KL), ``reports/summary.csv`` (a DVC plot) and ``reports/plots/*.png``
(``mc_core.evaluation.plots``: accuracy vs. rate per arch; per-turn accuracy per cell, where
prompt-dependent pruning fails turns 2-3; accuracy per question type per cell, ``by-type.png``;
the any-rate compressors against the per-rate ones, ``any-rate.png``).

Usage: ``python -m tasks.report`` (stage) or ``python -m tasks.report --show`` (print the
existing summary and where to look next; what ``make run`` ends with).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks import common, params, report_any
from tasks.cells import cell_file, cell_key, format_rate

PARAMS = ("grid", "report")
SUMMARY_MD = Path("reports/summary.md")
PLOTS = Path("reports/plots")


def collect(grid: params.GridParams) -> list[dict]:
    """One record per cell: its eval metrics and registry entry (error names a missing file)."""
    cells = []
    for arch, rate in grid.cells():
        ev = cell_file("eval", arch, rate)
        if not ev.is_file():
            raise ValueError(
                f"{ev}: missing evaluation of cell {cell_key(arch, rate)} "
                f"(run `dvc repro evaluate@{cell_key(arch, rate)}`)"
            )
        reg = cell_file("registry", arch, rate)
        cells.append(
            {
                "arch": arch,
                "rate": rate,
                "eval": json.loads(ev.read_text()),
                "registry": json.loads(reg.read_text()) if reg.is_file() else None,
            }
        )
    return cells


def _trained(methods: dict) -> str | None:
    """The trainable method of an eval report (the one the cell's compressor is)."""
    from mc_core.compressors import trained_method

    return trained_method(methods)


def _heuristics(methods: dict) -> list[str]:
    """The prompt-agnostic heuristics of an eval report (neither trained, nor the reference,
    nor prompt-dependent like fastv)."""
    from mc_core.compressors import prompt_agnostic

    return prompt_agnostic(methods)


def _prompt_dependent(names) -> list[str]:
    """The prompt-dependent methods among ``names`` (FastV, CDPruner), in order: their later
    turns keep the first prompt's choice, so the summary shows them turn by turn."""
    from mc_core.compressors import available, get_class

    return [m for m in dict.fromkeys(names) if m in available() and get_class(m).prompt_dependent]


def _shown(ms: dict, methods: list[str]) -> list[str]:
    """What a comparison of a cell shows: ``methods`` and, chosen from the data, the cell's best
    prompt-agnostic heuristic and its prompt-dependent methods (those present)."""
    heur = _heuristics(ms)
    extra = ([_best(ms, heur)] if heur else []) + _prompt_dependent(ms)
    return [m for m in dict.fromkeys([*methods, *extra]) if m in ms]


def _turns(entry: dict) -> str:
    return "/".join(f"{a:.2f}" for a in entry.get("acc_turn", [])) or "-"


def _row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _best(ms: dict, methods: list[str]) -> str:
    """The method of ``methods`` with the highest acc_avg in ``ms``."""
    return max(methods, key=lambda m: ms[m]["acc_avg"])


def _acc(entry: dict) -> str:
    """``0.612 [0.57, 0.66]`` (95% bootstrap interval over dialogues when recorded)."""
    if "acc_avg" not in entry:
        return "-"
    ci = entry.get("acc_avg_ci")
    text = f"{entry['acc_avg']:.3f}"
    seeds = entry.get("seeds")
    if seeds:  # trained with several seeds: mean +- sd beside the first seed's interval
        text = f"{seeds['mean']:.3f} ± {seeds['sd']:.3f} (n={len(seeds['acc_avg'])})"
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else text


def verdict(ms: dict) -> str:
    """The trained method against the best prompt-agnostic heuristic: ``win`` only where the
    95% intervals separate, ``loss`` where they separate the other way, else ``tie``."""
    from mc_core.evaluation.stats import separated

    mc, heur = _trained(ms), _heuristics(ms)
    if mc is None or not heur:
        return "-"
    best = _best(ms, heur)
    a, b = ms[mc].get("acc_avg_ci"), ms[best].get("acc_avg_ci")
    if a is None or b is None:
        return f"no CI (vs {best})"
    if separated(a, b):
        return f"win vs {best}"
    if separated(b, a):
        return f"loss vs {best}"
    return f"tie vs {best} (CIs overlap)"


def table(cells: list[dict], methods: list[str]) -> str:
    """Markdown: one row per cell, acc_avg [95% CI] per method, the trained method's turns, KL,
    its verdict against the best heuristic, and the registry's gate."""
    dependent = _prompt_dependent(m for c in cells for m in c["eval"]["methods"])
    head = [
        "arch",
        "rate",
        "dialogues",
        *methods,
        "mc turns 1/2/3",
        *(f"{m} turns 1/2/3" for m in dependent),
        "mc KL",
        "vs best heuristic",
        "registry",
    ]
    lines = [_row(head), "|" + "---|" * len(head)]
    for c in cells:
        ms = c["eval"]["methods"]
        accs = [_acc(ms[m]) if m in ms else "-" for m in methods]
        mc = ms.get(_trained(ms) or "", {})
        turns = "/".join(f"{a:.2f}" for a in mc.get("acc_turn", []))
        # Prompt-dependent methods keep turn 1's choice: their later turns show what it costs.
        dep = [_turns(ms.get(m, {})) for m in dependent]
        kl = f"{mc['kl_to_full']:.4f}" if "kl_to_full" in mc else "-"
        reg = c["registry"]
        where = "-"
        if reg:
            where = f"{reg['name']} v{reg['version']} (champion v{reg['champion'] or '-'})"
            if reg.get("gate"):
                where += f": {reg['gate']['reason']}"
        n = c["eval"].get("n_dialogues", c["eval"].get("dialogues", "?"))
        lines.append(
            _row(
                [
                    c["arch"],
                    format_rate(c["rate"]),
                    str(n),
                    *accs,
                    turns,
                    *dep,
                    kl,
                    verdict(ms),
                    where,
                ]
            )
        )
    return "\n".join(lines) + "\n"


def cell_checks(ms: dict) -> dict | None:
    """What a cell says about the trained method, as numbers: ``retention`` (its acc_avg over
    the full model's), ``best_heuristic`` and its acc_avg, ``ci_lo_above_best`` (the trained
    method's interval starts above that accuracy), ``vs_best_paired`` (trained minus best
    heuristic over the same dialogues with its paired bootstrap interval, when the report has
    per-dialogue scores; else None) and ``fastv_turn_drop`` (FastV's turn 1 minus the mean of
    its later turns: what choosing tokens for the first prompt costs later). None when the
    report has no trained method or no ``none`` reference."""
    from mc_core.evaluation.stats import paired_difference

    mc, heur = _trained(ms), _heuristics(ms)
    if mc is None or "none" not in ms or not heur:
        return None
    best = _best(ms, heur)
    out = {
        "retention": ms[mc]["acc_avg"] / ms["none"]["acc_avg"] if ms["none"]["acc_avg"] else None,
        "best_heuristic": best,
        "best_heuristic_acc": ms[best]["acc_avg"],
        "beats_every_heuristic": all(ms[mc]["acc_avg"] >= ms[h]["acc_avg"] for h in heur),
        "ci_lo_above_best": (
            ms[mc]["acc_avg_ci"][0] > ms[best]["acc_avg"] if "acc_avg_ci" in ms[mc] else None
        ),
        "vs_best_paired": None,
        "fastv_turn_drop": None,
    }
    a, b = ms[mc].get("acc_dialogues"), ms[best].get("acc_dialogues")
    if a and b:
        out["vs_best_paired"] = paired_difference(a, b)
    turns = ms.get("fastv", {}).get("acc_turn", [])
    if len(turns) > 1:
        out["fastv_turn_drop"] = turns[0] - sum(turns[1:]) / len(turns[1:])
    return out


def checks_table(cells: list[dict]) -> str:
    """Markdown: the numbers of `cell_checks` per cell."""
    head = [
        "arch",
        "rate",
        "retention (trained / none)",
        "≥ every heuristic",
        "best heuristic",
        "CI low end > best heuristic",
        "trained − best, paired [95% CI]",
        "FastV turn 1 − later turns",
    ]
    lines = [_row(head), "|" + "---|" * len(head)]
    for c in cells:
        ck = cell_checks(c["eval"]["methods"])
        if ck is None:
            continue
        ret = "-" if ck["retention"] is None else f"{ck['retention']:.2f}"
        ci = {None: "-", True: "yes", False: "no"}[ck["ci_lo_above_best"]]
        drop = "-" if ck["fastv_turn_drop"] is None else f"{ck['fastv_turn_drop']:+.3f}"
        best = f"{ck['best_heuristic']} {ck['best_heuristic_acc']:.3f}"
        every = "yes" if ck["beats_every_heuristic"] else "no"
        pd = ck["vs_best_paired"]
        paired = "-"
        if pd is not None:
            paired = f"{pd['diff']:+.3f} [{pd['ci'][0]:+.3f}, {pd['ci'][1]:+.3f}]"
        rate = format_rate(c["rate"])
        lines.append(_row([c["arch"], rate, ret, every, best, ci, paired, drop]))
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def versus_table(cells: list[dict]) -> str:
    """Markdown: per cell, the trained method against every other compressor of the report
    (prompt-agnostic and prompt-dependent), each with its accuracy, turns and the paired
    difference (trained − method) over the same dialogues with its 95% interval."""
    from mc_core.evaluation.stats import paired_difference

    head = ["arch", "rate", "method", "acc [95% CI]", "turns 1/2/3", "trained − method, paired"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for c in cells:
        ms = c["eval"]["methods"]
        mc = _trained(ms)
        if mc is None:
            continue
        rivals = sorted((m for m in ms if m not in (mc, "none")), key=lambda m: -ms[m]["acc_avg"])
        for m in [mc, *rivals]:
            a, b = ms[mc].get("acc_dialogues"), ms[m].get("acc_dialogues")
            paired = "-"
            if m != mc and a and b:
                pd = paired_difference(a, b)
                paired = f"{pd['diff']:+.3f} [{pd['ci'][0]:+.3f}, {pd['ci'][1]:+.3f}]"
            rate = format_rate(c["rate"])
            lines.append(_row([c["arch"], rate, m, _acc(ms[m]), _turns(ms[m]), paired]))
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def ceilings_table(cells: list[dict]) -> str:
    """Markdown: per cell, the trained method beside the selector and oracle ceilings and the
    [CLS] overlap of the oracle's tokens (the paper's Figure 1)."""
    head = [
        "arch",
        "rate",
        "trained",
        "selector",
        "oracle (subsample)",
        "full on subsample",
        "oracle top-m in top-m [CLS]",
        "object-centre mass: trained / best heuristic / oracle",
    ]
    lines = [_row(head), "|" + "---|" * len(head)]
    for c in cells:
        ce, ms = c["eval"].get("ceilings"), c["eval"]["methods"]
        if not ce:
            continue
        sel, orc, cls = ce.get("selector", {}), ce.get("oracle", {}), ce.get("cls_overlap", {})
        sel_s = _acc(sel) if "acc_avg" in sel else f"n/a ({sel.get('note', '-')})"
        orc_s = (
            f"{_acc(orc)} (n={orc['dialogues']}, {orc['steps']} steps)" if "acc_avg" in orc else "-"
        )
        ref = orc.get("none_acc_avg")
        cls_s = (
            f"{cls['share']:.2f} (chance {cls['chance']:.2f})"
            if "share" in cls
            else cls.get("note", "-")
        )
        trained, heur = ms.get(_trained(ms) or "", {}), _heuristics(ms)
        mass = [
            trained.get("centre_mass"),
            ms[_best(ms, heur)].get("centre_mass") if heur else None,
            orc.get("centre_mass"),
        ]
        lines.append(
            _row(
                [
                    c["arch"],
                    format_rate(c["rate"]),
                    _acc(trained),
                    sel_s,
                    orc_s,
                    f"{ref:.3f}" if ref is not None else "-",
                    cls_s,
                    " / ".join("-" if v is None else f"{v:.2f}" for v in mass),
                ]
            )
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _type_methods(report: dict) -> list[str]:
    """What the by-type table and plot compare in a cell: the full model, the best
    prompt-agnostic heuristic and the trained method (those present)."""
    ms = report["methods"]
    heur, trained = _heuristics(ms), _trained(ms)
    names = ["none"] + ([_best(ms, heur)] if heur else []) + ([trained] if trained else [])
    return [m for m in names if m in ms]


def types_table(cells: list[dict]) -> str:
    """Markdown: accuracy per question type (the dataset's own labels) of the full model, the
    best heuristic and the trained method, per cell; the full model's row gives each type's
    turn count. Empty where no report has ``acc_by_type``."""
    entries = [m for c in cells for m in c["eval"]["methods"].values()]
    types = sorted({t for m in entries for t in m.get("acc_by_type") or {}})
    if not types:
        return ""
    lines = [_row(["arch", "rate", "method", *types]), "|" + "---|" * (len(types) + 3)]
    for c in cells:
        ms = c["eval"]["methods"]
        for name in _type_methods(c["eval"]):
            by = ms[name].get("acc_by_type") or {}  # _type_methods: present ones only
            vals = [
                "-"
                if t not in by
                else f"{by[t]['acc']:.3f}" + (f" (n={by[t]['n']})" if name == "none" else "")
                for t in types
            ]
            rate = format_rate(c["rate"])
            lines.append(_row([c["arch"], rate, name, *vals]))
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plots(cells: list[dict], methods: list[str], dpi: int, out: Path) -> list[Path]:
    """Accuracy vs. rate (all archs), the ceilings beside the trained method, accuracy per
    question type per cell, and per-turn accuracy per cell (``mc_core.evaluation.plots``)."""
    from mc_core.evaluation import plots as mplots

    reports = [c["eval"] for c in cells]
    # Every comparison shows each cell's best heuristic, chosen from the data (not only the
    # params' list), and the prompt-dependent methods.
    drawn = dict.fromkeys(m for r in reports for m in _shown(r["methods"], methods))
    written = [
        mplots.accuracy_vs_rate(
            reports,
            out / "acc-vs-rate.png",
            methods=[m for m in drawn if m != mplots.REFERENCE],
            dpi=dpi,
        )
    ]
    if any("acc_avg" in v for r in reports for v in r.get("ceilings", {}).values()):
        trained = sorted({t for r in reports if (t := _trained(r["methods"]))})
        written.append(
            mplots.ceilings_vs_rate(reports, out / "ceilings.png", methods=trained, dpi=dpi)
        )
    if any(m.get("acc_by_type") for r in reports for m in r["methods"].values()):
        written.append(
            mplots.accuracy_by_type(reports, out / "by-type.png", methods_of=_type_methods, dpi=dpi)
        )
    for c in cells:
        present = _shown(c["eval"]["methods"], methods)
        written.append(
            mplots.accuracy_per_turn(
                c["eval"],
                out / f"turns-{cell_key(c['arch'], c['rate'])}.png",
                methods=present,
                dpi=dpi,
            )
        )
    return written


def where_next() -> str:
    """Pointers printed after the table."""
    from mc_registry import tracking_uri

    mlflow = tracking_uri()
    return (
        "Where to look next:\n"
        "  reports/summary.md, reports/plots/*.png   this table and the plots\n"
        "  dvc metrics show / dvc plots show          metrics and curves of every stage\n"
        f"  MLflow ({mlflow}): `make serve`, then http://127.0.0.1:5000 (runs + registry)\n"
        "  load a compressor: mc_registry.load_compressor("
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
    md = (
        "# MetaCompress summary\n\nAccuracy averaged over the 3 turns, per method, with its "
        "95% bootstrap interval over dialogues [lo, hi]. A win is claimed only where the "
        "intervals separate.\n\n"
    )
    md += table(cells, methods)
    checks = checks_table(cells)
    if checks:
        md += (
            "\n## Per cell\n\nHow much of the full model the trained method keeps, whether it "
            "reaches every prompt-agnostic heuristic and whether its interval starts above the "
            "best one, its difference to that heuristic paired over the same dialogues (an "
            "interval that excludes 0 is not noise of the test draw), and how far FastV "
            "(tokens chosen for the first question) falls on the later turns.\n\n" + checks
        )
    versus = versus_table(cells)
    if versus:
        md += (
            "\n## Against every method\n\nEvery compressor of each cell beside the trained "
            "one, best first: its accuracy, its turns (prompt-dependent methods keep the first "
            "question's choice for the later turns) and the trained method's difference to it, "
            "paired over the same dialogues, with its 95% bootstrap interval.\n\n" + versus
        )
    ceil = ceilings_table(cells)
    if ceil:
        md += (
            "\n## Ceilings\n\nThe ground-truth object-centre selector (all test dialogues) "
            "and the per-dialogue oracle P (a seeded subsample; its `full` reference on the "
            "same dialogues beside it), and how many of the oracle's top-m tokens are among "
            "the top-m [CLS]-attention tokens. The last column says which tokens each P keeps: "
            "for the token nearest each object's centre, the mass P gives it (capped at 1), "
            "averaged over objects (1: every object's centre kept whole).\n\n" + ceil
        )
    types = types_table(cells)
    if types:
        md += (
            "\n## By question type\n\nAccuracy over all turns of each question type (the "
            "dataset's own labels), for the full model, the best prompt-agnostic heuristic of "
            "the cell and the trained method: where a gap between them comes from.\n\n" + types
        )
    comparisons = report_any.collect(p.grid, cells)
    md += report_any.section(comparisons)
    common.write_text(SUMMARY_MD, md)
    summary = {
        cell_key(c["arch"], c["rate"]): {
            **{
                m: {k: v[k] for k in ("acc_avg", "acc_avg_ci", "kl_to_full") if k in v}
                for m, v in c["eval"]["methods"].items()
                if m in methods
            },
            **(
                {
                    "ceilings": {
                        k: {f: v[f] for f in ("acc_avg", "acc_avg_ci", "share", "chance") if f in v}
                        for k, v in c["eval"]["ceilings"].items()
                    }
                }
                if "ceilings" in c["eval"]
                else {}
            ),
            "verdict": verdict(c["eval"]["methods"]),
            "checks": cell_checks(c["eval"]["methods"]),
        }
        for c in cells
    }
    if comparisons:
        summary["any_rate"] = report_any.summary(comparisons)
    common.write_json("reports/summary.json", summary)
    rows = [
        {
            "cell": cell_key(c["arch"], c["rate"]),
            "method": m,
            "acc_avg": c["eval"]["methods"][m]["acc_avg"],
        }
        for c in cells
        for m in methods
        if m in c["eval"]["methods"]
    ]
    common.write_csv("reports/summary.csv", rows, ["cell", "method", "acc_avg"])
    with common.staged_dir(PLOTS) as tmp:
        plots(cells, methods, p.report.dpi, tmp)
        report_any.plot(comparisons, p.report.dpi, tmp)
    print(
        f"report: wrote {SUMMARY_MD} and {PLOTS}/ ({len(cells)} cells); "
        "`python -m tasks.report --show` prints it",
        flush=True,
    )


if __name__ == "__main__":
    with common.stage("report"):
        main()
