"""The summary (tasks/report.py): intervals shown, wins only where they separate, ceilings."""

from __future__ import annotations

from tasks import report


def _m(acc: float, ci: tuple[float, float]) -> dict:
    return {"acc_turn": [acc] * 3, "acc_avg": acc, "acc_avg_ci": list(ci), "kl_to_full": 0.5}


def _cell(mc_ci, sample_ci, ceilings=None) -> dict:
    ev = {
        "arch": "tiny-llava",
        "rate": 0.9,
        "n_dialogues": 300,
        "methods": {
            "none": _m(0.9, (0.87, 0.93)),
            "sample": _m(0.4, sample_ci),
            "pool": _m(0.35, (0.3, 0.4)),
            "fastv": _m(0.7, (0.65, 0.75)),
            "metacompress": _m(sum(mc_ci) / 2, mc_ci),
        },
    }
    if ceilings:
        ev["ceilings"] = ceilings
    return {"arch": "tiny-llava", "rate": 0.9, "eval": ev, "registry": None}


def test_verdict_needs_separated_intervals():
    assert report.verdict(_cell((0.5, 0.6), (0.35, 0.45))["eval"]["methods"]) == "win vs sample"
    # Point estimate 0.475 > 0.4, but the intervals overlap: no win claimed.
    tie = report.verdict(_cell((0.42, 0.53), (0.35, 0.45))["eval"]["methods"])
    assert tie.startswith("tie vs sample")
    # fastv (prompt-dependent) is no heuristic here, though it scores higher.
    assert report.verdict(_cell((0.2, 0.3), (0.35, 0.45))["eval"]["methods"]) == "loss vs sample"


def test_table_shows_intervals_and_dialogues():
    md = report.table([_cell((0.5, 0.6), (0.35, 0.45))], ["none", "sample", "metacompress"])
    row = md.splitlines()[2]
    assert "| 300 |" in row and "0.550 [0.50, 0.60]" in row and "win vs sample" in row
    assert report.ceilings_table([_cell((0.5, 0.6), (0.35, 0.45))]) == ""


def test_ceilings_table():
    ce = {
        "selector": {"available": False, "note": "no object_centres"},
        "oracle": {**_m(0.8, (0.7, 0.9)), "dialogues": 24, "steps": 150, "none_acc_avg": 0.85},
        "cls_overlap": {"share": 0.12, "chance": 0.1, "dialogues": 24},
    }
    md = report.ceilings_table([_cell((0.5, 0.6), (0.35, 0.45), ce)])
    row = md.splitlines()[2]
    assert "n/a (no object_centres)" in row and "(n=24, 150 steps)" in row
    assert "0.850" in row and "0.12 (chance 0.10)" in row
    assert row.endswith("| - / - / - |")  # no centre_mass recorded: not invented
    cell = _cell((0.5, 0.6), (0.35, 0.45), ce)
    ms = cell["eval"]["methods"]
    ms["metacompress"]["centre_mass"], ms["sample"]["centre_mass"] = 0.71, 0.25
    ms["pool"]["centre_mass"] = 0.9  # not the best heuristic (0.35 < sample's 0.4): not shown
    ce["oracle"]["centre_mass"] = 0.333
    row = report.ceilings_table([cell]).splitlines()[2]
    assert row.endswith("| 0.71 / 0.25 / 0.33 |")


def test_cell_checks_and_their_table():
    cell = _cell((0.5, 0.6), (0.35, 0.45))
    ms = cell["eval"]["methods"]
    ms["fastv"]["acc_turn"] = [0.8, 0.6, 0.7]  # turn 1 chose the tokens
    ck = report.cell_checks(ms)
    assert abs(ck["retention"] - 0.55 / 0.9) < 1e-12
    assert (ck["best_heuristic"], ck["best_heuristic_acc"]) == ("sample", 0.4)
    assert ck["beats_every_heuristic"] and ck["ci_lo_above_best"]  # 0.5 > 0.4
    assert abs(ck["fastv_turn_drop"] - 0.15) < 1e-12
    # The interval's low end below the best heuristic's accuracy: not claimed.
    low = report.cell_checks(_cell((0.38, 0.6), (0.35, 0.45))["eval"]["methods"])
    assert low["ci_lo_above_best"] is False and low["beats_every_heuristic"]
    assert ck["vs_best_paired"] is None  # no per-dialogue scores in this report
    row = report.checks_table([cell]).splitlines()[2]
    assert "| 0.61 | yes | sample 0.400 | yes | - | +0.150 |" in row
    # With per-dialogue scores: the difference paired over the same dialogues.
    ms["metacompress"]["acc_dialogues"] = [1.0] * 55 + [0.0] * 45
    ms["sample"]["acc_dialogues"] = [1.0] * 40 + [0.0] * 60
    pd = report.cell_checks(ms)["vs_best_paired"]
    assert abs(pd["diff"] - 0.15) < 1e-12 and 0.0 < pd["ci"][0] < 0.15 < pd["ci"][1]
    row = report.checks_table([cell]).splitlines()[2]
    assert f"| +0.150 [{pd['ci'][0]:+.3f}, {pd['ci'][1]:+.3f}] |" in row
    del ms["none"]
    assert report.cell_checks(ms) is None and report.checks_table([cell]) == ""


def test_types_table_shows_full_best_heuristic_and_trained_per_type():
    cell = _cell((0.5, 0.6), (0.35, 0.45))
    assert report.types_table([cell]) == ""  # no acc_by_type in any report: no section
    ms = cell["eval"]["methods"]
    ms["none"]["acc_by_type"] = {"count": {"acc": 0.8, "n": 40}, "shape": {"acc": 1.0, "n": 60}}
    ms["sample"]["acc_by_type"] = {"count": {"acc": 0.5, "n": 40}, "shape": {"acc": 0.9, "n": 60}}
    ms["pool"]["acc_by_type"] = {"count": {"acc": 0.99, "n": 40}}  # not the best heuristic
    ms["metacompress"]["acc_by_type"] = {"shape": {"acc": 0.95, "n": 60}}
    lines = report.types_table([cell]).splitlines()
    assert lines[0] == "| arch | rate | method | count | shape |"
    assert lines[2].endswith("| none | 0.800 (n=40) | 1.000 (n=60) |")
    assert lines[3].endswith("| sample | 0.500 | 0.900 |")
    assert lines[4].endswith("| metacompress | - | 0.950 |")  # a type it lacks is not invented
    assert len(lines) == 5
