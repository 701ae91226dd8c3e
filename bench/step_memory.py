"""What one training step holds, measured, beside what `mc_core.training.memory` estimates.

`StepMonitor` is a callback of `mc_core.training.loop.train` (``log_every=1``): it timestamps
every step and, once the first step is done, resets the peak-memory counter, so the peak it
reports covers the later steps only. The first step is left out on purpose: it also holds the
run's set-up (the compressor, the optimiser, a target cache when none was passed in) and the
first touch of every buffer, none of which the estimator models; later steps are the steady
state a long run lives in.

How the peak is read:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (live tensors,
  the weights included): directly what the estimator's total models.
- CPU: the process' resident set is all there is. A process also holds the Python and torch
  runtime, the dataset and the target store, which the estimate leaves out. So the monitor takes
  the resident set at the reset (after ``gc.collect`` and glibc's ``malloc_trim(0)``, which
  returns freed heap pages, so the baseline holds no dead tensors), resets the high-water mark
  (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` at the end:

      measured = weights + generator state + (VmHWM over the steps - VmRSS at the reset)

  i.e. the model's resident bytes that the estimate counts (the frozen weights and the
  generator's parameters, gradients and optimiser state, counted exactly from the tensors), plus
  everything the steps added on top. The runs set ``MALLOC_MMAP_THRESHOLD_`` (`MALLOC_ENV`) so
  that every allocation above 64 KiB is its own mapping, returned to the system when the tensor
  is freed: the resident set then follows the live tensors instead of glibc's retained heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Iterable

import torch

from bench.machine import _proc_status

__all__ = [
    "MALLOC_ENV",
    "StepMonitor",
    "bytes_of",
    "weight_bytes",
]

# Large allocations as their own mappings (freed at once, no heap retention; glibc's default
# threshold moves up to 32 MiB as blocks are freed, after which freed tensors stay resident).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}

GIB = 1024**3


def bytes_of(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are stored."""
    return bytes_of([*model.parameters(), *model.buffers()])


def _malloc_trim() -> bool:
    """Give freed heap pages back to the system (glibc only); whether it could."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class StepMonitor:
    """`train` callback: step times, and the peak memory of the steps after the first.

    Args:
        device: the training device.
        resident_bytes: bytes that are resident at the reset and that the estimate counts
            (weights + generator state, `weight_bytes` / `bytes_of`); CPU only.
    """

    def __init__(self, device: torch.device, resident_bytes: int = 0):
        self.device = torch.device(device)
        self.resident_bytes = int(resident_bytes)
        self.times: list[float] = [time.perf_counter()]
        self.metrics: list[dict[str, float]] = []
        self.rss_at_reset: float | None = None
        self.method = ""

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self._sync()
        self.times.append(time.perf_counter())
        self.metrics.append(dict(metrics))
        if len(self.times) == 2:  # the first step has ended: measure from here on
            self._reset()
            self.times[-1] = time.perf_counter()  # the reset's own cost is no step's

    def _reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = (
                "torch.cuda.max_memory_allocated over the steps after the first (after "
                "torch.cuda.reset_peak_memory_stats; live tensors, weights included)"
            )
            return
        trimmed = _malloc_trim()
        self.rss_at_reset = (_proc_status("VmRSS") or float("nan")) * 2**20
        if not _reset_hwm():
            raise RuntimeError(
                "cannot reset the peak resident set (/proc/self/clear_refs not writable): the "
                "CPU step peak needs Linux >= 4.0"
            )
        self.method = (
            "CPU: weights + generator state (exact tensor bytes) + VmHWM over the steps after "
            "the first - VmRSS at their start (after gc.collect"
            + (" and malloc_trim(0)" if trimmed else "")
            + "; peak reset through /proc/self/clear_refs)"
        )

    @property
    def steps(self) -> int:
        """Steps seen."""
        return len(self.metrics)

    def step_seconds(self) -> list[float]:
        """Duration of every step but the first (the first also includes the run's set-up)."""
        return [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]

    def median_step_s(self) -> float:
        """Median duration of the steps after the first; NaN with fewer than 2 steps."""
        s = self.step_seconds()
        return statistics.median(s) if s else float("nan")

    def peak_bytes(self) -> float:
        """The measured peak of the steps after the first (module docstring); NaN before."""
        if len(self.times) < 3:
            return float("nan")
        if self.device.type == "cuda":
            self._sync()
            return float(torch.cuda.max_memory_allocated(self.device))
        hwm = (_proc_status("VmHWM") or float("nan")) * 2**20
        return self.resident_bytes + hwm - self.rss_at_reset
