"""Put lmms-eval's per-turn accuracies beside the project evaluator's report of a method.

    python -m mc_lmms.compare runs/lmms reports/eval/tiny-llava-0.9.json \\
        --task mt_synthetic --method metacompress

``runs/lmms`` is lmms-eval's ``--output_path`` (its newest ``*_results.json`` with the task is
read) or one results file. The exit status is 1 when a turn differs by more than ``--tol``
(default 1e-9: the same per-dialogue scores averaged in the same order agree to rounding).
Both must cover the same dialogues: the evaluator's ``max_dialogues`` and lmms-eval's
``--limit`` select the first N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["compare", "lmms_turns", "main"]


def _results_file(path: Path, task: str) -> Path:
    if path.is_file():
        return path
    found = [
        p
        for p in sorted(path.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
        if task in json.loads(p.read_text()).get("results", {})
    ]
    if not found:
        raise ValueError(f"{path}: no lmms-eval *_results.json with task {task!r}")
    return found[-1]


def lmms_turns(results: dict[str, Any], task: str) -> list[float]:
    """``acc_turn_1..k`` of ``task`` from an lmms-eval results document (filter ``none``)."""
    res = results.get("results", {}).get(task)
    if res is None:
        have = sorted(results.get("results", {}))
        raise ValueError(f"lmms-eval results have no task {task!r}; they have {have}")
    turns = []
    while f"acc_turn_{len(turns) + 1},none" in res:
        turns.append(float(res[f"acc_turn_{len(turns) + 1},none"]))
    if not turns:
        raise ValueError(f"lmms-eval results of {task!r} have no acc_turn_<k> metrics")
    return turns


def compare(lmms: str | Path, report: str | Path, *, task: str, method: str) -> tuple[list, list]:
    """``(lmms_eval_turns, evaluator_turns)`` for ``method``.

    Raises:
        ValueError: a missing file, task or method (named).
    """
    results = json.loads(_results_file(Path(lmms), task).read_text())
    doc = json.loads(Path(report).read_text())
    methods = doc.get("methods", {})
    if method not in methods:
        raise ValueError(f"{report}: no method {method!r}; it has {sorted(methods)}")
    return lmms_turns(results, task), [float(a) for a in methods[method]["acc_turn"]]


def main(argv: list[str] | None = None) -> int:
    """CLI; returns the exit status (0 = every turn agrees within ``--tol``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lmms", help="lmms-eval --output_path folder or a *_results.json")
    ap.add_argument("report", help="the evaluator's reports/eval/<arch>-<rate>.json")
    ap.add_argument("--task", required=True, help="the lmms-eval task (e.g. mt_synthetic)")
    ap.add_argument("--method", required=True, help="the method in the report")
    ap.add_argument("--tol", type=float, default=1e-9)
    a = ap.parse_args(argv)
    ours, theirs = compare(a.lmms, a.report, task=a.task, method=a.method)
    print(f"{'turn':>5} {'lmms-eval':>10} {'evaluator':>10}")
    for k, (x, y) in enumerate(zip(ours, theirs, strict=False)):
        print(f"{k + 1:>5} {x:>10.4f} {y:>10.4f}")
    same = len(ours) == len(theirs) and all(
        abs(x - y) <= a.tol for x, y in zip(ours, theirs, strict=True)
    )
    print("agree" if same else "DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
