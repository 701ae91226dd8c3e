"""The any-rate comparison (mc_core.evaluation.any_rate) and the report's section on it."""

from __future__ import annotations

import pytest

from mc_core.evaluation.any_rate import compare
from tasks import report_any


def _m(scores: list[float]) -> dict:
    return {"acc_avg": sum(scores) / len(scores), "acc_dialogues": scores}


def _any_report() -> dict:
    n = 40
    return {
        "method": "metacompress-any",
        "span": [0.5, 0.9],
        "rates": {
            # grid rates: the any-rate compressor alone; the cells hold the rest
            "0.5": {"methods": {"metacompress-any": _m([1.0] * n)}},
            "0.9": {"methods": {"metacompress-any": _m([1.0] * 30 + [0.0] * 10)}},
            # a probe rate: on test, "b" looks best; on val, "a" was
            "0.7": {
                "methods": {
                    "metacompress-any": _m([1.0] * 20 + [0.0] * 20),
                    "a": _m([1.0] * 10 + [0.0] * 30),
                    "b": _m([1.0] * 30 + [0.0] * 10),
                }
            },
            # outside the span: heuristics only
            "0.3": {"methods": {"a": _m([1.0] * n), "b": _m([0.0] * n)}},
        },
        "validation": {
            "rates": {
                "0.7": {"methods": {"a": {"acc_avg": 0.8}, "b": {"acc_avg": 0.6}}},
                "0.3": {"methods": {"a": {"acc_avg": 0.2}, "b": {"acc_avg": 0.9}}},
            }
        },
    }


def _cells() -> dict:
    n = 40
    return {
        0.5: {"methods": {"metacompress": _m([1.0] * n), "none": _m([1.0] * n)}},
        0.9: {"methods": {"metacompress": _m([1.0] * n), "none": _m([1.0] * n)}},
    }


def test_compare_pairs_per_dialogue_and_chooses_the_heuristic_on_val():
    got = compare(_any_report(), _cells(), trained="metacompress", heuristics=["a", "b"])
    rows = {r["rate"]: r for r in got["rates"]}
    assert list(rows) == [0.3, 0.5, 0.7, 0.9] and got["span"] == [0.5, 0.9]
    # Equal on every dialogue: difference 0, interval [0, 0], non-inferior.
    assert rows[0.5]["vs_per_rate"]["diff"] == 0 and rows[0.5]["vs_per_rate"]["non_inferior"]
    # 10 of 40 dialogues worse: -0.25, far below the margin.
    vs = rows[0.9]["vs_per_rate"]
    assert vs["diff"] == pytest.approx(-0.25) and not vs["non_inferior"] and vs["ci"][1] < 0
    # At the probe rate the heuristic is the val-best "a", though "b" is better on test.
    assert rows[0.7]["best_heuristic"] == "a" and rows[0.7]["best_heuristic_val"] == 0.8
    assert rows[0.7]["vs_best"]["diff"] == pytest.approx(0.25)
    assert rows[0.7]["vs_best"]["at_least_as_good"] and rows[0.7]["trained"] is False
    # Outside the span: the val-best heuristic is named, nothing is compared.
    assert rows[0.3]["best_heuristic"] == "b" and rows[0.3]["vs_best"] is None
    assert "metacompress-any" not in rows[0.3]["points"]
    # The points of the plot: the cells' methods at the grid rates, beside the any-rate one.
    assert set(rows[0.5]["points"]) == {"metacompress", "none", "metacompress-any"}


def test_compare_pairs_seed_means_when_both_sides_have_seeds():
    n = 40
    report, cells = _any_report(), _cells()
    mine = report["rates"]["0.9"]["methods"]["metacompress-any"]  # fails 10 of 40
    seeds = [mine["acc_dialogues"], [1.0] * n]  # a second seed that fails none
    mine["seeds"] = {"seeds": [0, 1], "acc_dialogues": seeds}
    per = cells[0.9]["methods"]["metacompress"]
    per["seeds"] = {"seeds": [0, 1], "acc_dialogues": [[1.0] * n, [1.0] * 30 + [0.0] * 10]}
    got = compare(report, cells, trained="metacompress", heuristics=["a", "b"])
    vs = {r["rate"]: r for r in got["rates"]}[0.9]["vs_per_rate"]
    # Seed means 0.875 against 0.875: no difference, but the seeds disagree by 0.25, so the
    # interval is wide and non-inferiority is not claimed.
    assert vs["seeds"] == [2, 2] and vs["diff"] == pytest.approx(0.0)
    assert vs["ci"][0] < -0.1 and not vs["non_inferior"]
    # Without seeds on the per-rate side: its one compressor, the any-rate's two seeds.
    del per["seeds"]
    got = compare(report, cells, trained="metacompress", heuristics=["a", "b"])
    vs = {r["rate"]: r for r in got["rates"]}[0.9]["vs_per_rate"]
    assert vs["seeds"] == [2, 1] and vs["diff"] == pytest.approx(-0.125)
    text = report_any.section({"tiny": {**got, "trained_method": "metacompress"}})
    assert "seeds 2 vs 1" in text


def test_compare_refuses_reports_of_other_dialogues():
    cells = _cells()
    cells[0.5]["methods"]["metacompress"] = _m([1.0] * 39)
    with pytest.raises(ValueError, match="scores of the same dialogues: got 40 and 39"):
        compare(_any_report(), cells, trained="metacompress", heuristics=["a", "b"])


def test_report_section_summary_and_plot(tmp_path):
    comp = compare(_any_report(), _cells(), trained="metacompress", heuristics=["a", "b"])
    comp.update(trained_method="metacompress", heuristics=["a", "b"])
    md = report_any.section({"tiny-llava": comp})
    assert "| tiny-llava | 0.7 (probe) | 0.500" in md and "| a 0.250" in md
    assert "| tiny-llava | 0.9 | 0.750" in md and "| no |" in md
    js = report_any.summary({"tiny-llava": comp})["tiny-llava"]["rates"]
    assert js["0.9"]["vs_per_rate"]["non_inferior"] is False and js["0.3"]["acc_avg"] is None
    (png,) = report_any.plot({"tiny-llava": comp}, 60, tmp_path)
    assert png.name == "any-rate.png" and png.stat().st_size > 0
    assert report_any.section({}) == "" and report_any.plot({}, 60, tmp_path) == []
