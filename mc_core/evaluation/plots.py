"""Plots of the evaluation reports (matplotlib, Agg backend, PNG written atomically).

- `accuracy_vs_rate(reports, path)`: one panel per architecture, one line per method
  (`acc_avg` against the rate), the uncompressed reference as a dashed horizontal line.
- `any_rate_curve(comparisons, path)`: per architecture, accuracy against rate of an any-rate
  compressor (its trained span shaded) beside the per-rate compressors (points) and the
  heuristics (`mc_core.evaluation.any_rate.compare` records).
- `accuracy_per_turn(report, path)`: one cell, one line per method over turns 1..3 (FastV's
  drop after turn 1 is the paper's finding).
- `ceilings_vs_rate(reports, path)`: per architecture, `acc_avg` with its 95% interval for the
  given methods beside the cell's ceilings (ground-truth selector, per-dialogue oracle).
- `accuracy_by_type(reports, path)`: one panel per cell, accuracy per question type (the
  dataset's own labels, `acc_by_type`) as grouped bars, one bar per method.
- `token_maps_figure(maps, path)`: per image, where MetaCompress's P draws its tokens from
  (column mass over the patch grid, overlaid on the image) beside the tokens FastV keeps.
- `fastv_layers(report, path)`: one cell's FastV per layer K (a `tasks.sensitivity` report):
  accuracy per turn, and how much the question steers layer K (`mc_core.evaluation.probe`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mc_core import io  # noqa: E402

__all__ = [
    "accuracy_per_turn",
    "accuracy_vs_rate",
    "any_rate_curve",
    "ceilings_vs_rate",
    "fastv_layers",
    "load_reports",
    "token_maps_figure",
]

REFERENCE = "none"


def load_reports(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read evaluation JSONs (`reports/eval/<arch>-<rate>.json`).

    Raises:
        ValueError: a file is missing or lacks `arch`, `rate` or `methods` (names the file).
    """
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"{path}: no such evaluation report")
        data = json.loads(path.read_text())
        missing = {"arch", "rate", "methods"} - set(data)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        out.append(data)
    return out


def _rate_panel(ax, arch: str, refs: Sequence[float], ylabel: str) -> None:
    """An against-rate panel's frame: the uncompressed reference (the mean of ``refs``)
    dashed, the arch as title, the axis labels and the grid."""
    if refs:
        ax.axhline(float(np.mean(refs)), color="k", linestyle="--", label="no reduction")
    ax.set_title(arch)
    ax.set_xlabel("reduction rate")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    try:
        with io.staged_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def accuracy_vs_rate(
    reports: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    metric: str = "acc_avg",
    dpi: int = 120,
) -> Path:
    """Accuracy against the reduction rate, one panel per architecture, one line per method.

    Args:
        reports: evaluation reports (several rates, possibly several architectures).
        path: the PNG to write.
        methods: methods to draw (default: every method found, reference aside).
        metric: the per-method metric on the y axis.
        dpi: resolution.

    Raises:
        ValueError: no reports, or a requested method absent from every report.
    """
    if not reports:
        raise ValueError("accuracy_vs_rate needs at least one report")
    archs = sorted({r["arch"] for r in reports})
    found = [m for r in reports for m in r["methods"]]
    names = list(dict.fromkeys(methods or [m for m in found if m != REFERENCE]))
    for m in names:
        if m not in found:
            raise ValueError(f"method {m!r} is in none of the reports (found {sorted(set(found))})")
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        cells = sorted((r for r in reports if r["arch"] == arch), key=lambda r: r["rate"])
        for m in names:
            pts = [(c["rate"], c["methods"][m][metric]) for c in cells if m in c["methods"]]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=m)
        refs = [c["methods"][REFERENCE][metric] for c in cells if REFERENCE in c["methods"]]
        _rate_panel(ax, arch, refs, metric)
    axes[0][-1].legend(fontsize=7, loc="best")
    return _save(fig, path, dpi)


def any_rate_curve(
    comparisons: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    trained: str,
    heuristics: Sequence[str],
    dpi: int = 120,
) -> Path:
    """Accuracy against rate, one panel per arch (``comparisons``: arch -> a
    `mc_core.evaluation.any_rate.compare` record): the any-rate compressor as a line with its
    95% band over the rates it serves (its trained span shaded), the per-rate compressors
    (``trained``) as points with error bars, each of ``heuristics`` as a thin line, the full
    model dashed.

    Raises:
        ValueError: no comparisons.
    """
    if not comparisons:
        raise ValueError("any_rate_curve needs at least one arch's comparison")
    archs = sorted(comparisons)
    fig, axes = plt.subplots(1, len(archs), figsize=(5.0 * len(archs), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        comp = comparisons[arch]
        rows, name = comp["rates"], comp["method"]

        def series(m, rows=rows):
            pts = [(r["rate"], r["points"][m]) for r in rows if m in r["points"]]
            xs = [x for x, _ in pts]
            ys = [e["acc_avg"] for _, e in pts]
            ci = [e.get("acc_avg_ci", (e["acc_avg"], e["acc_avg"])) for _, e in pts]
            return xs, ys, ci

        if comp.get("span"):
            ax.axvspan(*comp["span"], color="tab:blue", alpha=0.07, label=f"{name} trained span")
        for m in heuristics:
            xs, ys, _ = series(m)
            if xs:
                ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.8, label=m)
        pts = [(r["rate"], p) for r in rows if (p := _point(r["points"].get(trained, {})))]
        if pts:
            ax.errorbar(
                [x for x, _ in pts],
                [p[0] for _, p in pts],
                yerr=np.array([[p[1] for _, p in pts], [p[2] for _, p in pts]]),
                fmt="s",
                color="tab:red",
                capsize=3,
                label=f"{trained} (one per rate)",
            )
        xs, ys, ci = series(name)
        if xs:
            ax.plot(xs, ys, marker="o", color="tab:blue", linewidth=2, label=name)
            ax.fill_between(
                xs, [lo for lo, _ in ci], [hi for _, hi in ci], color="tab:blue", alpha=0.15
            )
        refs = [r["points"][REFERENCE]["acc_avg"] for r in rows if REFERENCE in r["points"]]
        _rate_panel(ax, arch, refs, "acc_avg (test)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    return _save(fig, path, dpi)


def _point(entry: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """(acc_avg, lower error, upper error) of a method or ceiling entry; None if it has none."""
    if "acc_avg" not in entry:
        return None
    y = float(entry["acc_avg"])
    lo, hi = entry.get("acc_avg_ci", (y, y))
    return y, max(y - float(lo), 0.0), max(float(hi) - y, 0.0)


def ceilings_vs_rate(
    reports: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    methods: Sequence[str] = ("metacompress",),
    ceilings: Sequence[str] = ("selector", "oracle"),
    dpi: int = 120,
) -> Path:
    """``acc_avg`` with 95% intervals against the rate, per architecture: ``methods`` beside
    the ceilings of each cell (``report["ceilings"][name]``; cells without one are skipped),
    the uncompressed reference dashed. The oracle's interval is over its subsample.

    Raises:
        ValueError: no reports, or no report holds any of the ceilings.
    """
    if not reports:
        raise ValueError("ceilings_vs_rate needs at least one report")
    if not any(_point(r.get("ceilings", {}).get(c, {})) for r in reports for c in ceilings):
        raise ValueError(f"no report holds any of the ceilings {list(ceilings)}")
    archs = sorted({r["arch"] for r in reports})
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.4), squeeze=False)
    series = [(m, lambda r, m=m: r["methods"].get(m, {}), "o", "-") for m in methods]
    series += [(c, lambda r, c=c: r.get("ceilings", {}).get(c, {}), "^", ":") for c in ceilings]
    for ax, arch in zip(axes[0], archs, strict=True):
        cells = sorted((r for r in reports if r["arch"] == arch), key=lambda r: r["rate"])
        for k, (label, get, marker, style) in enumerate(series):
            pts = [(c["rate"], p) for c in cells if (p := _point(get(c)))]
            if not pts:
                continue
            # A small x offset per series keeps overlapping intervals readable.
            xs = [x + 0.006 * (k - len(series) / 2) for x, _ in pts]
            ys = [p[0] for _, p in pts]
            err = np.array([[p[1] for _, p in pts], [p[2] for _, p in pts]])
            ax.errorbar(xs, ys, yerr=err, marker=marker, linestyle=style, capsize=3, label=label)
        refs = [c["methods"][REFERENCE]["acc_avg"] for c in cells if REFERENCE in c["methods"]]
        _rate_panel(ax, arch, refs, "acc_avg (95% CI)")
    axes[0][-1].legend(fontsize=7, loc="best")
    return _save(fig, path, dpi)


def accuracy_per_turn(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    dpi: int = 120,
) -> Path:
    """Accuracy per turn, one line per method (reference included), for one cell."""
    names = list(methods or report["methods"])
    if not names:
        raise ValueError("accuracy_per_turn: the report has no methods")
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for m in names:
        if m not in report["methods"]:
            raise ValueError(
                f"method {m!r} not in the report of {report.get('arch')} @ {report.get('rate')}"
            )
        acc = report["methods"][m]["acc_turn"]
        style = dict(color="k", linestyle="--") if m == REFERENCE else {}
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=m, **style)
    ax.set_xticks(range(1, len(report["methods"][names[0]]["acc_turn"]) + 1))
    ax.set_xlabel("turn")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report.get('arch', '?')} @ rate {report.get('rate', '?')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, dpi)


def accuracy_by_type(
    reports: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    methods_of: Callable[[Mapping[str, Any]], Sequence[str]] | None = None,
    dpi: int = 120,
) -> Path:
    """Accuracy per question type (``acc_by_type``), one panel per cell (rows: architectures,
    columns: rates), grouped bars per type, one bar per method of ``methods_of(report)``
    (default: all of the report's methods; those without ``acc_by_type`` are left out).

    Raises:
        ValueError: no report holds ``acc_by_type`` for any of its methods.
    """
    pick = methods_of or (lambda r: list(r["methods"]))
    cells = [
        (r, [m for m in pick(r) if (r["methods"].get(m) or {}).get("acc_by_type")]) for r in reports
    ]
    cells = [(r, ms) for r, ms in cells if ms]
    if not cells:
        raise ValueError("accuracy_by_type: no report holds acc_by_type")
    archs = sorted({r["arch"] for r, _ in cells})
    rates = sorted({r["rate"] for r, _ in cells})
    fig, axes = plt.subplots(
        len(archs), len(rates), figsize=(3.6 * len(rates), 2.9 * len(archs)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for r, names in cells:
        ax = axes[archs.index(r["arch"])][rates.index(r["rate"])]
        ax.set_visible(True)
        types = sorted({t for m in names for t in r["methods"][m]["acc_by_type"]})
        width = 0.8 / len(names)
        for k, m in enumerate(names):
            by = r["methods"][m]["acc_by_type"]
            xs = [i + (k - (len(names) - 1) / 2) * width for i, t in enumerate(types) if t in by]
            ys = [by[t]["acc"] for t in types if t in by]
            style = dict(color="0.6") if m == REFERENCE else {}
            ax.bar(xs, ys, width=width, label=m, **style)
        ax.set_xticks(range(len(types)), types, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{r['arch']} @ rate {r['rate']}", fontsize=9)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()  # rows of panels: keep titles clear of the tick labels above
    return _save(fig, path, dpi)


def fastv_layers(report: Mapping[str, Any], path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """FastV per layer K: accuracy per turn (left); kept-set overlap across a dialogue's
    questions and turn 1's object-centre recall, with the random-set level (right)."""
    layers = report.get("layers") or {}
    if not layers:
        raise ValueError("fastv_layers: the report has no 'layers' section")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.8, 3.4))
    for entry in layers.values():
        acc = entry["acc_turn"]
        left.plot(range(1, len(acc) + 1), acc, marker="o", label=f"K = {entry['layer']}")
        left.set_xticks(range(1, len(acc) + 1))
    left.set_xlabel("turn")
    left.set_ylabel("accuracy")
    left.set_title(f"FastV, {report.get('arch', '?')} @ rate {report.get('rate', '?')}")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    probes = [
        (e["layer"], e["question_overlap"]) for e in layers.values() if "question_overlap" in e
    ]
    if probes:
        ks = [k for k, _ in probes]
        over = [q["overlap"] for _, q in probes]
        err = [
            [q["overlap"] - q["overlap_ci"][0] for _, q in probes],
            [q["overlap_ci"][1] - q["overlap"] for _, q in probes],
        ]
        right.errorbar(
            ks, over, yerr=err, marker="o", capsize=3, label="kept-set overlap across questions"
        )
        recall = [(k, q["centre_recall"]) for k, q in probes if q.get("centre_recall") is not None]
        if recall:
            right.plot(*zip(*recall, strict=True), marker="s", label="object centres kept (turn 1)")
        right.axhline(probes[0][1]["chance"], color="k", linestyle="--", label="random set (m / n)")
        right.set_xticks(ks)
        right.set_ylim(0, 1)
    right.set_xlabel("LLM layer K")
    right.set_ylabel("share")
    right.set_title("how much the question steers layer K")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="best")
    return _save(fig, path, dpi)


def _mass_image(mass: np.ndarray, grid) -> np.ndarray | None:
    # Exact row-major grids are drawn as cells; packed layouts are scattered at positions.
    if grid is not None and grid[0] * grid[1] == mass.size:
        return mass.reshape(grid)
    return None


def token_maps_figure(
    maps: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    left: str = "metacompress",
    right: str = "fastv",
    dpi: int = 120,
) -> Path:
    """Per image: `left`'s column mass of P over the image, beside `right`'s kept tokens.

    Args:
        maps: output of `mc_core.evaluation.token_maps.token_maps` (needs `left` and `right`
            in `mass`).
        path: the PNG to write.
        left, right: method names of the two columns.
        dpi: resolution.
    """
    if not maps:
        raise ValueError("token_maps_figure needs at least one image")
    fig, axes = plt.subplots(len(maps), 2, figsize=(6.4, 3.2 * len(maps)), squeeze=False)
    for row, entry in zip(axes, maps, strict=True):
        for ax, name in zip(row, (left, right), strict=True):
            if name not in entry["mass"]:
                raise ValueError(f"token map of {entry.get('dialogue_id')} has no {name!r} mass")
            image = np.asarray(entry["image"])
            h, w = image.shape[:2]
            mass = np.asarray(entry["mass"][name], dtype=np.float64)
            ax.imshow(image)
            grid_img = _mass_image(mass, entry.get("grid"))
            if grid_img is not None:
                ax.imshow(
                    grid_img, extent=(0, w, h, 0), alpha=0.55, cmap="magma", interpolation="nearest"
                )
            elif entry.get("positions") is not None:
                pos = np.asarray(entry["positions"])
                ax.scatter(pos[:, 1] * w, pos[:, 0] * h, s=12, c=mass, cmap="magma", alpha=0.8)
            ax.set_title(f"{name}: {entry.get('question', '')}"[:48], fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path, dpi)
