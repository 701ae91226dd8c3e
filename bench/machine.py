"""The instruments of a benchmark run and the description of the machine it ran on.

Timing: `Clock` (CUDA events on GPU, ``time.perf_counter`` on CPU). Peak memory:
`PeakMemory` (on GPU ``torch.cuda.max_memory_allocated`` after a reset, weights included, like
the paper's numbers; on CPU the process' peak resident set, ``VmHWM``, after resetting it
through ``/proc/self/clear_refs`` on Linux, which needs no allocation tracing and so does not
slow the run down; both also give the delta over the memory in use before the block).
`describe_machine` and `machine_slug`: what a result file records about, and is named after,
the machine.
"""

from __future__ import annotations

import os
import platform
import time

import torch

__all__ = ["Clock", "PeakMemory", "describe_machine", "machine_slug"]


class Clock:
    """Named marks along one run; durations between consecutive marks in milliseconds.

    On CUDA the marks are events recorded in the current stream (no host sync in between);
    elsewhere they are `time.perf_counter` readings.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        """Record a point in time named `name` (the interval ending here gets this name)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def intervals(self) -> dict[str, float]:
        """{name of the end mark: ms since the previous mark}; syncs CUDA first."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def _proc_status(key: str) -> float | None:
    """A `kB` field of /proc/self/status in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU, peak RSS (VmHWM) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.peak_mb = float("nan")
        self.delta_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.before = _proc_status("VmRSS") or float("nan")
        try:  # "5" resets the peak RSS counter (Linux >= 4.0, proc(5))
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after /proc/self/clear_refs reset"
        except OSError:
            self.method = "ru_maxrss (process lifetime peak: no reset available)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.method.startswith("VmHWM"):
            self.peak_mb = _proc_status("VmHWM") or float("nan")
        else:
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.delta_mb = self.peak_mb - self.before


def describe_machine(device: torch.device) -> dict:
    """CPU model, cores, versions, device name, thread count, load at the start."""
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(device: torch.device) -> str:
    """Short machine label for file names: GPU name on CUDA, `cpu-<cores>c` otherwise."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"cpu-{os.cpu_count()}c"
