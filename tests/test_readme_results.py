"""The README's results table says what the committed eval reports say.

The table is written by hand (it picks columns from several sections of reports/summary.md), so
a retrained cell whose README row was not updated would state numbers nobody measured. Every
figure of every row is recomputed here from reports/eval/<arch>-<rate>.json at the precision
the README prints it. A workspace whose eval reports differ from the committed ones (a re-run with
other params, new cells) is not what the README describes, so the check is skipped there.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tasks import cells, report

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| cell | none | MetaCompress | kept of none |"


def _local_reports() -> str:
    """``git status`` of reports/eval: empty where the reports are the committed ones."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "reports/eval"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""  # no git: the reports are as shipped
    return out.stdout.strip() if out.returncode == 0 else ""


def _rows() -> list[list[str]]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip("|").split("|")])
    return rows


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def _expected(arch: str, rate: str) -> list[str]:
    ev = json.loads((ROOT / cells.cell_file("eval", arch, float(rate))).read_text())
    ms, ceil = ev["methods"], ev["ceilings"]
    mc, none = ms["metacompress"], ms["none"]
    checks = report.cell_checks(ms)
    best = checks["best_heuristic"]
    paired = checks["vs_best_paired"]
    oracle = ceil["oracle"]
    return [
        f"{arch} {rate}",
        f"{none['acc_avg']:.3f}",
        report._acc(mc),  # the summary's "0.888 [0.87, 0.91]"
        f"{checks['retention']:.2f}",
        f"{best} {report._acc(ms[best])}",
        f"{_signed(paired['diff'])} [{_signed(paired['ci'][0])}, {_signed(paired['ci'][1])}]",
        "/".join(f"{a:.2f}".lstrip("0") for a in ms["fastv"]["acc_turn"]),
        "/".join(f"{a:.2f}".lstrip("0") for a in ms["cdpruner"]["acc_turn"]),
        f"{ceil['selector']['acc_avg']:.3f}",
        f"{oracle['acc_avg']:.3f} (full {oracle['none_acc_avg']:.3f})",
    ]


def test_readme_results_table_matches_the_committed_eval_reports():
    changed = _local_reports()
    if changed:
        pytest.skip(
            f"reports/eval differs from the commit, the README describes the commit:\n{changed}"
        )
    rows = _rows()
    # The cells' reports (an any-rate compressor's, <arch>-any.json, is the summary's).
    cells = sorted(
        p.stem for p in (ROOT / "reports" / "eval").glob("*.json") if not p.stem.endswith("-any")
    )
    assert len(rows) == len(cells), f"README rows {len(rows)} vs eval reports {cells}"
    for row in rows:
        arch, rate = re.fullmatch(r"(\S+) (\S+)", row[0]).groups()
        assert row == _expected(arch, rate), f"README row of {arch} {rate} is stale"
