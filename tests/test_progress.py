"""progress: a tqdm bar only on a terminal, rate-limited plain lines in captured logs."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mc_core.progress import LogProgress, format_duration, progress

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch):
    monkeypatch.delenv("MC_PROGRESS", raising=False)
    monkeypatch.delenv("MC_PROGRESS_INTERVAL", raising=False)


def test_captured_log_gets_rate_limited_lines_without_carriage_returns():
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=1000, desc="train r=0.9", stream=out, interval=5.0, clock=clock)
    assert isinstance(bar, LogProgress)
    for _ in range(1000):  # 1000 steps over 125 s: one line per 5 s at most, plus the last
        clock.t += 0.125
        bar.update(1)
        bar.set_postfix(loss="0.41")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 24 + 1  # 5 s, 10 s, ... 120 s, then the final line at 125 s
    assert lines[0].startswith("[train r=0.9] 40/1000 (4%) 8 it/s elapsed 0:05 eta 2:00")
    assert lines[0].endswith("loss=0.41")
    assert lines[-1].startswith("[train r=0.9] 1000/1000 (100%) 8 it/s took 2:05")


def test_iterable_and_resume():
    out, clock = io.StringIO(), FakeClock()
    seen = []
    for x in progress(range(3), desc="cache", stream=out, interval=60.0, clock=clock):
        clock.t += 10
        seen.append(x)
    assert seen == [0, 1, 2]
    assert out.getvalue() == "[cache] 3/3 (100%) 10 s/it took 0:30\n"  # only the final line
    out = io.StringIO()
    bar = progress(total=10, initial=8, stream=out, interval=0.0, clock=clock)
    clock.t += 1
    bar.update(2)
    bar.close()
    assert out.getvalue() == "10/10 (100%) 2 it/s took 0:01\n"  # rate counts this run only


def test_terminal_gets_tqdm_and_disable_or_env_silences(monkeypatch):
    term = Terminal()
    bar = progress(total=3, desc="eval", stream=term)
    assert type(bar).__module__.startswith("tqdm")
    bar.update(3)
    bar.close()
    assert "eval" in term.getvalue()
    quiet = io.StringIO()
    with progress(total=3, stream=quiet, disable=True, interval=0.0) as bar:
        bar.update(3)
    monkeypatch.setenv("MC_PROGRESS", "off")
    with progress(total=3, stream=quiet, interval=0.0) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_bad_settings_are_named(monkeypatch):
    monkeypatch.setenv("MC_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="MC_PROGRESS='fancy'"):
        progress(total=1, stream=io.StringIO())
    monkeypatch.setenv("MC_PROGRESS", "log")
    monkeypatch.setenv("MC_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="MC_PROGRESS_INTERVAL='soon'"):
        progress(total=1, stream=io.StringIO())


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(61.4) == "1:01"
    assert format_duration(3725) == "1:02:05"


def test_stage_lines_name_cell_time_and_outputs(tmp_path, capsys):
    from mc_core.io import staged_dir, write_json
    from tasks.common import stage

    out = tmp_path / "reports" / "eval.json"
    folder = tmp_path / "models" / "ckpt"
    with stage("evaluate", ["--arch", "tiny-llava", "--rate", "0.9"]):
        write_json(out, {"ok": 1})
        with staged_dir(folder) as tmp:  # files inside a published folder: the folder only
            write_json(tmp / "config.json", {})
    start, done = capsys.readouterr().out.splitlines()
    assert start == "[stage evaluate tiny-llava-0.9] start"
    assert done.startswith("[stage evaluate tiny-llava-0.9] done in 0:0")
    assert done.endswith(f"-> {out}, {folder}")
    with pytest.raises(KeyError), stage("report", []):
        raise KeyError("x")
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("[stage report] failed after 0:00: KeyError")
    )


def test_library_bars_off_only_off_terminal(monkeypatch):
    from transformers.utils import logging as hf_logging

    from mc_core.progress import quiet_library_bars

    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    hf_logging.enable_progress_bar()
    assert quiet_library_bars(Terminal()) is False
    assert hf_logging.is_progress_bar_enabled()
    assert quiet_library_bars(io.StringIO()) is True
    assert not hf_logging.is_progress_bar_enabled()  # no "Loading weights" frames in a log
    hf_logging.enable_progress_bar()


def test_sigterm_unwinds_a_stage(tmp_path):
    # A cancelled stage (DVC / Prefect send SIGTERM) runs its finally blocks and says so.
    code = textwrap.dedent(
        """
        import os, signal, sys
        from tasks import common
        with common.stage("train"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                print("cleanup ran", flush=True)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert "cleanup ran" in r.stdout
    assert "[stage train] failed after 0:00: Terminated" in r.stdout
