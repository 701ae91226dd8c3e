"""An any-rate compressor against the per-rate ones and the heuristics, rate by rate.

One generator trained over many rates (``TrainConfig.rates``) is evaluated at every rate it is
compared at: the grid's rates, where a per-rate compressor was trained for exactly that rate,
and probe rates no per-rate compressor trained at, where it meets the prompt-agnostic
heuristics. :func:`compare` joins the reports of both (the same test dialogues in the same
order, so the differences are paired per dialogue) into one record per rate:

- at a grid rate, ``vs_per_rate``: any-rate minus per-rate, with its paired bootstrap interval,
  and ``non_inferior``: the interval's lower end above ``-margin``. With several trained seeds
  (``train.seeds``: the reports' ``seeds`` records) it is the difference of the seed means and
  its interval resamples the seeds too (``stats.paired_seed_difference``): one seed against one
  seed, the interval covers the dialogues but not the training noise, which on the embedded
  world is as large as the margin (docs/method.md, section 11);
- at a probe rate, ``best_heuristic``: the heuristic with the highest accuracy on the
  validation split (chosen there, never on test), and ``vs_best``: any-rate minus it on test,
  paired, with ``at_least_as_good`` (the difference is >= 0) and ``better`` (its interval is
  above 0).

Every method's test accuracy and interval at every rate come along as ``points`` (the accuracy
against rate plot, ``mc_core.evaluation.plots.any_rate_curve``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mc_core.evaluation.stats import paired_difference, paired_seed_difference

__all__ = ["MARGIN", "compare"]

# The non-inferiority margin: an any-rate compressor "is non-inferior" to a per-rate one when
# the paired interval of their difference lies above -MARGIN (2 points of accuracy).
MARGIN = 0.02


def _key(rate: float) -> str:
    return repr(float(rate))


def _entry(e: Mapping[str, Any]) -> dict[str, Any]:
    out = {"acc_avg": float(e["acc_avg"])}
    if "acc_avg_ci" in e:
        out["acc_avg_ci"] = [float(v) for v in e["acc_avg_ci"]]
    return out


def _per_seed(e: Mapping[str, Any]) -> list | None:
    """One list of per-dialogue scores per trained seed: the entry's ``seeds`` record when
    it holds them (``train.seeds`` > 1), else its own scores as the one seed."""
    seeds = e.get("seeds") or {}
    if seeds.get("acc_dialogues"):
        return list(seeds["acc_dialogues"])
    return [e["acc_dialogues"]] if e.get("acc_dialogues") else None


def _paired(a: Mapping[str, Any], b: Mapping[str, Any], seed: int) -> dict | None:
    x, y = a.get("acc_dialogues"), b.get("acc_dialogues")
    if not x or not y:
        return None
    return paired_difference(x, y, seed=seed)


def _paired_seeds(a: Mapping[str, Any], b: Mapping[str, Any], seed: int) -> dict | None:
    """Any-rate minus per-rate over their seeds (`paired_seed_difference`): with one seed a
    side, the plain paired difference of the two compressors."""
    x, y = _per_seed(a), _per_seed(b)
    if not x or not y:
        return None
    return paired_seed_difference(x, y, seed=seed)


def compare(
    any_report: Mapping[str, Any],
    cells: Mapping[float, Mapping[str, Any]],
    *,
    trained: str,
    heuristics: Sequence[str],
    margin: float = MARGIN,
    seed: int = 0,
) -> dict[str, Any]:
    """Rate-by-rate comparison of an any-rate compressor (see the module docstring).

    Args:
        any_report: its evaluation (``rates.<rate>.methods`` on test, ``validation.rates``
            on the validation split, ``method``: its method key, ``span``).
        cells: the per-rate evaluation reports by rate (``methods`` on test, the per-rate
            compressor under ``trained``), on the same test dialogues.
        trained: the per-rate compressors' method key (``metacompress``).
        heuristics: the prompt-agnostic heuristics drawn and compared with.
        margin: the non-inferiority margin against the per-rate compressor.
        seed: the bootstrap seed of the paired intervals.

    Returns:
        ``{"method", "span", "margin", "rates": [{"rate", "trained": bool, "points":
        {method: {"acc_avg", "acc_avg_ci"}}, "vs_per_rate" | "vs_best": ...}, ...]}``, rates
        ascending.

    Raises:
        ValueError: a paired comparison over different numbers of dialogues (the reports are
            not of the same test dialogues).
    """
    name = any_report["method"]
    val_rates = (any_report.get("validation") or {}).get("rates", {})
    out_rates = []
    rates = {float(r) for r in any_report["rates"]} | {float(r) for r in cells}
    for rate in sorted(rates):
        here = dict(any_report["rates"].get(_key(rate), {}).get("methods", {}))
        cell = cells.get(rate)
        if cell is not None:
            here = {**cell["methods"], **here}  # the cell's methods, then the any-rate one
        points = {m: _entry(e) for m, e in here.items() if "acc_avg" in e}
        row: dict[str, Any] = {"rate": rate, "trained": cell is not None, "points": points}
        mine = here.get(name)
        if cell is not None and mine is not None and trained in cell["methods"]:
            pd = _paired_seeds(mine, cell["methods"][trained], seed)
            row["vs_per_rate"] = pd and {**pd, "non_inferior": pd["ci"][0] > -margin}
        elif cell is None:
            val = val_rates.get(_key(rate), {}).get("methods", {})
            ranked = [h for h in heuristics if h in val and h in here]
            if ranked:
                best = max(ranked, key=lambda h: val[h]["acc_avg"])
                row["best_heuristic"] = best
                row["best_heuristic_val"] = float(val[best]["acc_avg"])
                pd = _paired(mine, here[best], seed) if mine is not None else None
                row["vs_best"] = pd and {
                    **pd,
                    "at_least_as_good": pd["diff"] >= 0,
                    "better": pd["ci"][0] > 0,
                }
        out_rates.append(row)
    return {
        "method": name,
        "span": list(any_report.get("span", [])),
        "margin": margin,
        "rates": out_rates,
    }
