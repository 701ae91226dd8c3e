"""The report's any-rate section: each arch's any-rate compressor against its per-rate cells and
the heuristics, rate by rate (``mc_core.evaluation.any_rate.compare``), as a table, a
``summary.json`` block and the plot ``reports/plots/any-rate.png``.

Reads ``reports/eval/<arch>-any.json`` (``evaluate-any@<arch>``) for every arch of
``grid.any_rate_archs`` beside the cells' ``reports/eval/<arch>-<rate>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks import cells as names
from tasks import params

PLOT = "any-rate.png"


def collect(grid: params.GridParams, cells: list[dict]) -> dict[str, dict]:
    """Per arch of ``grid.any_rate_archs``, its comparison record (``compare``); ``cells`` are
    the report's cell records (``arch``, ``rate``, ``eval``). Error names a missing file."""
    from mc_core.compressors import prompt_agnostic, trained_method
    from mc_core.evaluation.any_rate import compare

    out = {}
    for arch in grid.any_rate_archs:
        f = names.cell_file("eval", arch, names.ANY)
        if not f.is_file():
            raise ValueError(
                f"{f}: missing evaluation of {arch}'s any-rate compressor "
                f"(run `dvc repro evaluate-any@{arch}`)"
            )
        report = json.loads(f.read_text())
        mine = {float(c["rate"]): c["eval"] for c in cells if c["arch"] == arch}
        trained = trained_method(next(iter(mine.values()))["methods"])
        # The heuristics are those the stage met at the probe rates (evaluate.probe_methods).
        heur = sorted(
            set(prompt_agnostic(m for r in report["rates"].values() for m in r["methods"]))
        )
        try:
            out[arch] = compare(report, mine, trained=trained, heuristics=heur)
        except ValueError as err:  # e.g. not the same test dialogues as the cells'
            raise ValueError(
                f"{f} against reports/eval/{arch}-<rate>.json: {err} (evaluate.max_dialogues "
                "changed between the stages? re-run them)"
            ) from None
        out[arch]["trained_method"], out[arch]["heuristics"] = trained, heur
    return out


def _pd(pd: dict | None) -> str:
    if not pd:
        return "-"
    return f"{pd['diff']:+.3f} [{pd['ci'][0]:+.3f}, {pd['ci'][1]:+.3f}]"


def _seeds(pd: dict | None) -> str:
    """ ", seeds 3 vs 3" when the difference is of seed means (``train.seeds`` > 1)."""
    k = (pd or {}).get("seeds", [1, 1])
    return "" if k == [1, 1] else f", seeds {k[0]} vs {k[1]}"


def _acc(e: dict | None) -> str:
    if not e:
        return "-"
    ci = e.get("acc_avg_ci")
    return f"{e['acc_avg']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def section(comparisons: dict[str, dict]) -> str:
    """Markdown: one row per arch and rate."""
    if not comparisons:
        return ""
    head = [
        "arch",
        "rate",
        "any-rate [95% CI]",
        "per-rate",
        "any − per-rate, paired",
        f"non-inferior (lo > −{next(iter(comparisons.values()))['margin']:g})",
        "best heuristic (on val)",
        "any − best, paired",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, comp in comparisons.items():
        name, trained = comp["method"], comp["trained_method"]
        for r in comp["rates"]:
            pts = r["points"]
            vs = r.get("vs_per_rate")
            ni = "-" if not vs else ("yes" if vs["non_inferior"] else "no")
            best = r.get("best_heuristic")
            best_s = f"{best} {_acc(pts.get(best))}" if best else "-"
            rate = names.format_rate(r["rate"]) + ("" if r["trained"] else " (probe)")
            row = [
                arch,
                rate,
                _acc(pts.get(name)),
                _acc(pts.get(trained)) if r["trained"] else "-",
                _pd(vs) + _seeds(vs),
                ni,
                best_s,
                _pd(r.get("vs_best")),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return (
        "\n## One compressor for every rate\n\nEach arch's any-rate compressor (one generator "
        "trained over many rates, run at the asked one) at the grid's rates, against the "
        "per-rate compressor trained for exactly that rate, and at probe rates no cell trained "
        "at, against the heuristic that was best there on data/val. Differences are paired "
        "over the same test dialogues, with their 95% bootstrap intervals; '-' where the "
        "any-rate compressor does not serve the rate (outside its trained span). With one "
        "trained seed per compressor (`train.seeds: 1`) an interval covers the test dialogues, "
        "not the training noise: a per-rate compressor retrained with another seed moves by "
        "about as much as the margin (docs/method.md, section 11); with more seeds the "
        "differences are of the seed means and their intervals resample the seeds too.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def summary(comparisons: dict[str, dict]) -> dict:
    """The ``summary.json`` block: per arch, per rate, the comparisons without the points."""
    return {
        arch: {
            "method": comp["method"],
            "span": comp["span"],
            "margin": comp["margin"],
            "rates": {
                names.format_rate(r["rate"]): {
                    k: v for k, v in r.items() if k not in ("rate", "points")
                }
                | {"acc_avg": r["points"].get(comp["method"], {}).get("acc_avg")}
                for r in comp["rates"]
            },
        }
        for arch, comp in comparisons.items()
    }


def plot(comparisons: dict[str, dict], dpi: int, out: Path) -> list[Path]:
    """``any-rate.png`` in ``out`` (nothing without any-rate compressors)."""
    if not comparisons:
        return []
    from mc_core.evaluation import plots as mplots

    first = next(iter(comparisons.values()))
    heur = sorted({h for c in comparisons.values() for h in c["heuristics"]})
    return [
        mplots.any_rate_curve(
            comparisons, out / PLOT, trained=first["trained_method"], heuristics=heur, dpi=dpi
        )
    ]
