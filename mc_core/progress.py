"""Progress that reads well both on a terminal and in a captured log.

On a terminal (the stream's `isatty()`), `progress` is a tqdm bar. Anywhere else (DVC stages,
Prefect workers, CI, a file) a redrawn bar would be stored as thousands of carriage-return
frames, so it prints instead one plain line at most every `interval` seconds
(`MC_PROGRESS_INTERVAL`, default 10), plus a last line when the stage's loop ends:

    [train r=0.9] 120/500 (24%) 3.1 it/s elapsed 0:38 eta 2:02 loss=0.41

`MC_PROGRESS=bar|log|off` forces a mode (e.g. `off` in tests). `quiet_library_bars()` turns
off the bars transformers, datasets and huggingface_hub draw themselves (loading weights,
mapping a dataset) under the same condition.

Example:
    >>> for batch in progress(loader, total=len(loader), desc="target cache"):
    ...     ...
    >>> bar = progress(total=steps, initial=step, desc="train")
    >>> bar.update(1); bar.set_postfix(loss="0.41"); bar.close()
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

__all__ = ["LogProgress", "format_duration", "progress", "quiet_library_bars"]

MODES = ("auto", "bar", "log", "off")


def format_duration(seconds: float) -> str:
    """`h:mm:ss` (or `m:ss` under an hour)."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _interval() -> float:
    raw = os.environ.get("MC_PROGRESS_INTERVAL", "10")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MC_PROGRESS_INTERVAL={raw!r}: expected seconds (a number)") from None
    if value < 0:
        raise ValueError(f"MC_PROGRESS_INTERVAL={raw!r}: expected seconds >= 0")
    return value


class LogProgress:
    """A tqdm-like counter that writes one line per `interval` seconds, never a redraw.

    Supports what the project uses of tqdm: iteration, `update`, `set_postfix`, `close` and
    use as a context manager.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        interval: float = 10.0,
        stream: TextIO | None = None,
        disable: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.n = int(initial)
        self.disable = disable
        self._initial = int(initial)
        self._interval = float(interval)
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress() without an iterable cannot be iterated; use update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return 0 if self.total is None else int(self.total)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Values shown at the end of the next line (`key=value`); `refresh` is tqdm's."""
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        done = self.total is not None and self.n >= self.total  # `close` writes that line
        if now - self._last >= self._interval and not done:
            self._write(now)

    def close(self) -> None:
        """Write the final line (once), unless nothing happened."""
        if self._closed:
            return
        self._closed = True
        if self.n > self._initial:
            self._write(self._clock(), final=True)

    def line(self, now: float, *, final: bool = False) -> str:
        """The status line at time `now`."""
        elapsed = now - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}" if self.total is None else f"{self.n}/{self.total}"
        parts = [f"[{self.desc}]" if self.desc else "", count]
        if self.total:
            parts.append(f"({100.0 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:.3g} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/it")
        parts.append(f"{'took' if final else 'elapsed'} {format_duration(elapsed)}")
        if not final and self.total and rate > 0:
            parts.append(f"eta {format_duration((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        return " ".join(p for p in parts if p)

    def _write(self, now: float, *, final: bool = False) -> None:
        self._last = now
        if self.disable:
            return
        self._stream.write(self.line(now, final=final) + "\n")
        self._stream.flush()


def _mode(stream: TextIO) -> str:
    mode = os.environ.get("MC_PROGRESS", "auto")
    if mode not in MODES:
        raise ValueError(f"MC_PROGRESS={mode!r}: expected one of {MODES}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if callable(isatty) and isatty() else "log"
    return mode


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    stream: TextIO | None = None,
    interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
):
    """A tqdm bar on a terminal, a `LogProgress` (a line every few seconds) elsewhere.

    Args:
        iterable: wrapped and iterated (optional: else call `update`).
        total: expected count (default `len(iterable)` when it has one).
        desc: label of the stage.
        initial: count already done (resumed training).
        disable: show nothing.
        leave: keep the bar on screen when done (terminal only).
        stream: where to write (default stderr; its `isatty()` picks the mode).
        interval: seconds between log lines (default `MC_PROGRESS_INTERVAL` or 10).
        clock: time source for the log lines (tests).
    """
    stream = stream if stream is not None else sys.stderr
    mode = "off" if disable else _mode(stream)
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, file=stream)
    return LogProgress(
        iterable,
        total=total,
        desc=desc,
        initial=initial,
        interval=_interval() if interval is None else interval,
        stream=stream,
        disable=mode == "off",
        clock=clock,
    )


def quiet_library_bars(stream: TextIO | None = None) -> bool:
    """Off a terminal, switch off the progress bars of transformers, datasets and
    huggingface_hub (they would fill a captured log with carriage-return frames).

    Returns:
        True when they were switched off (False on a terminal: bars stay).
    """
    if _mode(stream if stream is not None else sys.stderr) == "bar":
        return False
    # Libraries not imported yet read these at import; imported ones are switched off below.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    return True
