"""Loaded at start-up by a stage process whose PYTHONPATH holds this folder (reliability.disk).

``MC_FAULT_ENOSPC=<text>``: the first write of a safetensors file, a ``datasets`` save or a
JSON whose destination path contains ``<text>`` writes part of its bytes, then fails with
``OSError(ENOSPC)``, as a full disk does mid-write. Nothing happens without the variable.

``MC_FAULT_KILL_SAVE=<text>:<k>``: the process SIGKILLs itself halfway through its k-th
safetensors write to a path containing ``<text>`` (a kill that lands while a file is written,
at a chosen point instead of a lucky one).
"""

import errno
import os
import signal

_WHERE = os.environ.get("MC_FAULT_ENOSPC", "\0")  # "\0": in no path
_KILL = os.environ.get("MC_FAULT_KILL_SAVE")


def _full(path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _half(path: str) -> None:
    # A full disk leaves a partial file behind: the writer must never publish it.
    if os.path.isfile(path):
        with open(path, "r+b") as fh:
            fh.truncate(max(0, os.path.getsize(path) // 2))


def _install() -> None:
    import safetensors.torch as st

    save_file = st.save_file

    def fake_save_file(tensors, filename, *a, **k):
        save_file(tensors, filename, *a, **k)
        if _WHERE in str(filename):
            _half(str(filename))
            _full(filename)

    if _KILL:
        where, _, count = _KILL.rpartition(":")
        seen = []

        def killing_save_file(tensors, filename, *a, **k):
            if where in str(filename):
                seen.append(filename)
                if len(seen) == int(count):
                    save_file(tensors, filename, *a, **k)
                    _half(str(filename))
                    os.kill(os.getpid(), signal.SIGKILL)
            save_file(tensors, filename, *a, **k)

        st.save_file = killing_save_file
        return
    st.save_file = fake_save_file

    import datasets

    save_to_disk = datasets.Dataset.save_to_disk

    def fake_save_to_disk(self, dataset_path, *a, **k):
        save_to_disk(self, dataset_path, *a, **k)
        if _WHERE in str(dataset_path):
            for name in sorted(os.listdir(dataset_path)):
                if name.endswith(".arrow"):
                    _half(os.path.join(str(dataset_path), name))
            _full(dataset_path)

    datasets.Dataset.save_to_disk = fake_save_to_disk


if os.environ.get("MC_FAULT_ENOSPC") or _KILL:
    _install()
