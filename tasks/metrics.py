"""Stage ``metrics@<arch>-<rate>``: the numbers of a cell a person compares across runs, as one
compact DVC metric file, ``reports/metrics/<arch>-<rate>.json``.

The full reports (``reports/eval``, ``reports/base``, ``reports/train``: per-dialogue scores,
per-type breakdowns, curves) stay outputs of their stages; declared as metrics they made
``dvc metrics show`` one row tens of thousands of characters wide. This file keeps, flat enough
to read as a table row (``dvc metrics show``, ``dvc metrics diff``, ``dvc exp show``):

- ``acc.<method>``, ``lo.<method>``, ``hi.<method>``: each evaluated method's average accuracy
  on the test split and its 95% interval; ``val.<method>``: the accuracy on data/val of the
  methods evaluated there (the trained one, the gate's baseline): what a sweep chooses by;
- ``kl``: the trained method's KL to the full model on the test split, ``train_kl`` its last
  training KL;
- ``checks``: the summary's cell checks (retention, best heuristic's accuracy, beats every
  heuristic, interval above the best, the paired difference to it with its interval);
- ``base``: the base model's headline numbers (accuracy and interval, blank image, chance).

Stage ``metrics-any@<arch>`` (``--rate any``) does the same for the arch's any-rate compressor
(``reports/metrics/<arch>-any.json``): per rate it was evaluated at, ``acc.<rate>``,
``lo.<rate>``, ``hi.<rate>`` (test) and ``val.<rate>`` (data/val), ``mean`` (the averages over
the grid's rates on test and val, what its registry gate ranks by) and ``train_kl``. How it
compares with the per-rate compressors and the heuristics is the summary's (paired per
dialogue, which needs the cells' reports).

Usage: ``python -m tasks.metrics --arch tiny-llava --rate 0.5`` (``--rate any``)
"""

from __future__ import annotations

import json

from mc_core import io
from tasks import common
from tasks.cells import ANY, cell_file, report_file

PARAMS: tuple[str, ...] = ()  # reads only its reports (params.yaml is still validated)


def _round(x):
    return round(x, 4) if isinstance(x, float) else x


def cell_metrics(ev: dict, train: dict | None, base: dict | None) -> dict:
    """The compact metrics of one cell from its eval report, train metrics and base report."""
    from tasks.report import _trained, cell_checks

    ms = ev["methods"]
    out: dict = {"acc": {}, "lo": {}, "hi": {}}
    for name, m in ms.items():
        out["acc"][name] = _round(m["acc_avg"])
        lo, hi = m.get("acc_avg_ci") or (None, None)
        out["lo"][name], out["hi"][name] = _round(lo), _round(hi)
    # data/val, where recipes are chosen (a sweep's column): the methods the gate compares
    val = (ev.get("validation") or {}).get("methods", {})
    out["val"] = {name: _round(m.get("acc_avg")) for name, m in val.items()}
    trained = _trained(ms)
    out["kl"] = _round(ms[trained].get("kl_to_full")) if trained else None
    out["train_kl"] = _round(train.get("kl")) if train else None
    checks = cell_checks(ms)
    if checks is not None:
        paired = checks.pop("vs_best_paired") or {}
        checks.pop("fastv_turn_drop", None)
        checks["vs_best_diff"] = paired.get("diff")
        checks["vs_best_lo"], checks["vs_best_hi"] = paired.get("ci") or (None, None)
        out["checks"] = {k: _round(v) for k, v in checks.items()}
    if base is not None:
        lo, hi = base.get("acc_avg_ci") or (None, None)
        out["base"] = {
            "acc": _round(base.get("acc_avg")),
            "lo": _round(lo),
            "hi": _round(hi),
            "blank_image": _round(base.get("acc_blank_image")),
            "chance": _round(base.get("chance")),
        }
    return out


def any_metrics(ev: dict, train: dict | None) -> dict:
    """The compact metrics of an any-rate compressor from its evaluate-any report."""
    name = ev["method"]
    out: dict = {"acc": {}, "lo": {}, "hi": {}, "val": {}}
    for rate, entry in ev["rates"].items():
        m = entry["methods"].get(name)
        if m is None:  # outside its trained span
            continue
        out["acc"][rate] = _round(m["acc_avg"])
        out["lo"][rate], out["hi"][rate] = (_round(v) for v in m.get("acc_avg_ci") or (None,) * 2)
    val = (ev.get("validation") or {}).get("rates", {})
    for rate, entry in val.items():
        if name in entry["methods"]:
            out["val"][rate] = _round(entry["methods"][name]["acc_avg"])
    mean_val = (ev.get("validation") or {}).get("methods", {}).get(name, {})
    out["mean"] = {
        "acc": _round(ev["methods"].get(name, {}).get("acc_avg")),
        "val": _round(mean_val.get("acc_avg")),
        "kl": _round(ev["methods"].get(name, {}).get("kl_to_full")),
    }
    out["train_kl"] = _round(train.get("kl")) if train else None
    return out


def _read(path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    """Write the cell's compact metrics."""
    common.load_params(PARAMS, who="tasks.metrics")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv, any_rate=True)
    ev = _read(cell_file("eval", arch, rate))
    if ev is None:
        raise ValueError(f"{cell_file('eval', arch, rate)}: missing (run its evaluate stage)")
    train = _read(cell_file("train", arch, rate))
    if rate == ANY:
        out = any_metrics(ev, train)
    else:
        out = cell_metrics(ev, train, _read(report_file("base", arch)))
    io.write_json(cell_file("metrics", arch, rate), out)
    print(f"metrics: {cell_file('metrics', arch, rate)}", flush=True)


if __name__ == "__main__":
    with common.stage("metrics"):
        main()
