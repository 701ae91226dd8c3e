"""Plots: each writes a non-empty PNG with the expected panels and lines."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from conftest import make_image

from mc_core.evaluation import plots

matplotlib.use("Agg")


def _report(arch: str, rate: float, methods=("none", "sample", "fastv", "metacompress")) -> dict:
    return {
        "arch": arch,
        "rate": rate,
        "dataset": "unit",
        "methods": {
            m: {
                "acc_turn": [0.9 - rate / 10, 0.8, 0.7],
                "acc_avg": 0.8,
                "kl_to_full": 0.1,
                "prefill_ms": 1.0,
                "visual_tokens": 6,
                "prefill_tflops": 1e-6,
            }
            for m in methods
        },
    }


def _record_saves(monkeypatch, describe) -> list:
    """``describe(fig)`` of every figure the plot functions save, in order (then saved and
    closed as usual)."""
    seen = []
    real = plots._save

    def spy(fig, path, dpi):
        seen.append(describe(fig))
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


@pytest.fixture
def figures(monkeypatch):
    """Per saved figure, (lines, collections, images) of each panel."""
    return _record_saves(
        monkeypatch,
        lambda fig: [(len(ax.get_lines()), len(ax.collections), len(ax.images)) for ax in fig.axes],
    )


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_vs_rate_panels_and_lines(tmp_path, figures):
    paths = []
    for arch in ("tiny-llava", "tiny-qwen2-vl"):
        for rate in (0.5, 0.75, 0.9):
            p = tmp_path / f"{arch}-{rate}.json"
            p.write_text(json.dumps(_report(arch, rate)))
            paths.append(p)
    out = plots.accuracy_vs_rate(plots.load_reports(paths), tmp_path / "png" / "acc_vs_rate.png")
    assert _is_png(out)
    # Two architecture panels; 3 methods + the dashed reference line in each.
    assert [lines for lines, _, _ in figures[0]] == [4, 4]
    with pytest.raises(ValueError, match="magic"):
        plots.accuracy_vs_rate(plots.load_reports(paths), tmp_path / "x.png", methods=["magic"])
    with pytest.raises(ValueError, match="no such evaluation report"):
        plots.load_reports([tmp_path / "missing.json"])


def test_accuracy_per_turn_one_line_per_method(tmp_path, figures):
    out = plots.accuracy_per_turn(_report("tiny-llava", 0.9), tmp_path / "turns.png")
    assert _is_png(out)
    assert figures[0] == [(4, 0, 0)]


def test_token_maps_figure_two_columns_per_image(tmp_path, figures):
    maps = []
    for i in range(2):
        mass = torch.rand(64)
        keep = torch.zeros(64)
        keep[torch.randperm(64)[:8]] = 1.0
        maps.append(
            {
                "image": make_image(64, 64, seed=i),
                "dialogue_id": f"d{i}",
                "question": "what colour is at row 1 col 2 ?",
                "grid": (8, 8),
                "positions": None,
                "mass": {"metacompress": mass, "fastv": keep},
            }
        )
    # A packed layout (no exact grid) is scattered at its positions instead.
    maps.append({**maps[0], "grid": None, "positions": torch.rand(64, 2)})
    out = plots.token_maps_figure(maps, tmp_path / "maps.png")
    assert _is_png(out)
    panels = figures[0]
    assert len(panels) == 6
    assert all(images == 2 for _, _, images in panels[:4])  # image + mass overlay
    assert all(coll == 1 and images == 1 for _, coll, images in panels[4:])  # image + scatter


def test_ceilings_vs_rate_draws_methods_and_ceilings(tmp_path, monkeypatch):
    labels = _record_saves(
        monkeypatch, lambda fig: [ax.get_legend_handles_labels()[1] for ax in fig.axes]
    )
    reports = []
    for arch in ("tiny-llava", "tiny-qwen2-vl"):
        for rate in (0.5, 0.9):
            r = _report(arch, rate)
            r["methods"]["metacompress"]["acc_avg_ci"] = [0.75, 0.85]
            r["ceilings"] = {
                "selector": {"acc_avg": 0.9, "acc_avg_ci": [0.85, 0.95]},
                "oracle": {"acc_avg": 0.95, "acc_avg_ci": [0.9, 1.0]},
            }
            if arch == "tiny-qwen2-vl":  # a dataset without ground truth skips the selector
                r["ceilings"]["selector"] = {"available": False, "note": "no object_centres"}
            reports.append(r)
    out = plots.ceilings_vs_rate(reports, tmp_path / "ceilings.png")
    assert _is_png(out)
    # metacompress, selector, oracle + the reference on llava; qwen has no selector.
    assert labels[0] == [
        ["no reduction", "metacompress", "selector", "oracle"],
        ["no reduction", "metacompress", "oracle"],
    ]
    with pytest.raises(ValueError, match="ceilings"):
        plots.ceilings_vs_rate([_report("tiny-llava", 0.5)], tmp_path / "none.png")


def test_accuracy_by_type_one_panel_per_cell_one_bar_per_method_and_type(tmp_path, monkeypatch):
    seen = _record_saves(  # per visible panel: its bars and legend labels
        monkeypatch,
        lambda fig: [
            (len(ax.patches), ax.get_legend_handles_labels()[1])
            for ax in fig.axes
            if ax.get_visible()
        ],
    )
    reports = []
    for arch in ("tiny-llava", "tiny-qwen2-vl"):
        for rate in (0.5, 0.9):
            r = _report(arch, rate)
            for v in r["methods"].values():
                v["acc_by_type"] = {"count": {"acc": 0.6, "n": 10}, "shape": {"acc": 0.9, "n": 12}}
            del r["methods"]["fastv"]["acc_by_type"]  # a method without it is left out
            reports.append(r)
    del reports[-1]["methods"]["sample"]["acc_by_type"]["count"]  # a missing type: no bar
    out = plots.accuracy_by_type(reports, tmp_path / "by-type.png")
    assert _is_png(out)
    assert len(seen[0]) == 4  # 2 archs x 2 rates
    assert all(labels == ["none", "sample", "metacompress"] for _, labels in seen[0])
    assert [bars for bars, _ in seen[0]] == [6, 6, 6, 5]  # 3 methods x 2 types, one missing
    picked = plots.accuracy_by_type(
        reports[:1], tmp_path / "picked.png", methods_of=lambda r: ["none", "metacompress"]
    )
    assert _is_png(picked) and seen[1] == [(4, ["none", "metacompress"])]
    with pytest.raises(ValueError, match="acc_by_type"):
        plots.accuracy_by_type([_report("tiny-llava", 0.5)], tmp_path / "none.png")
