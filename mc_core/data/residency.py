"""Keeping the resident memory of a memory-mapped dataset bounded while its rows are read.

``datasets`` memory-maps a dataset's Arrow files, and every page a read touches stays mapped,
counted in the process' resident set (and in its cgroup's memory), until the dataset is dropped.
Linux maps whole page-cache folios on a fault: on the 6.18 kernel that measured it, reading one
random MT-GQA row mapped about 1 MB, so 2,000 rows of training's order mapped 88% of a
20k-dialogue dataset, and an epoch maps all of it (tens of GB for GQA train-balanced).

:func:`after_read`, called for every row read (``mc_core.data.schema.row``, the saved-images
source of the builders), drops the page-table entries of the dataset's mapped files after every
:data:`EVERY` rows: ``madvise(MADV_DONTNEED)`` on their read-only mappings, found in
``/proc/self/maps``. The data stay in the page cache, and a later read of a page faults it back
in from memory; a read-only file mapping holds no data of its own, so nothing is lost and no
buffer becomes invalid. Off Linux (no ``/proc/self/maps``) nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

__all__ = ["EVERY", "after_read", "dataset_files", "release"]

EVERY = 32  # rows between releases: at ~1 MB mapped per row, at most ~32 MB stays mapped
_MADV_DONTNEED = 4  # <sys/mman.h>, the same on every Linux architecture
_reads: dict[tuple[str, ...], int] = {}
_unsupported = False


def dataset_files(ds: Any) -> tuple[str, ...]:
    """The real paths of the Arrow files behind a ``datasets.Dataset`` (none for one in memory,
    or for rows given as a plain sequence, which the library accepts too)."""
    cache_files = getattr(ds, "cache_files", None) or ()
    return tuple(sorted({os.path.realpath(c["filename"]) for c in cache_files}))


def after_read(ds: Any) -> None:
    """Counts one row read from ``ds``; every :data:`EVERY` rows, :func:`release` its files."""
    if _unsupported:
        return
    files = dataset_files(ds)
    if not files:
        return
    count = _reads.get(files, 0) + 1
    if count >= EVERY:
        release(files)
        count = 0
    _reads[files] = count


def release(files: tuple[str, ...] | list[str]) -> int:
    """Drops this process' page-table entries for the read-only mappings of ``files``.

    Returns:
        The bytes of address space advised (0 off Linux, or when none is mapped).
    """
    global _unsupported
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        _unsupported = True
        return 0
    wanted = set(files)
    libc = _libc()
    done = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        # "start-end perms offset dev inode path": only read-only views of the files, which
        # hold no modified (private) pages that dropping could lose.
        if len(fields) < 6 or fields[5] not in wanted or fields[1][:2] != "r-":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc is not None and libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            done += end - start
    return done


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc
