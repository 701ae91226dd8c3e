"""Atomic outputs: the one place where files and folders are published.

Every writer in the project goes through these helpers, so a reader (DVC, MLflow, a later stage,
a person) never sees a half-written file or folder, whatever kills the writer:

- a file is written to a temporary sibling, flushed, given the shared permission policy, then
  renamed over the target (``os.replace`` is atomic within a filesystem);
- a folder is built in a temporary sibling and swapped in; the previous folder is moved aside
  first and restored if the swap fails, and removed only once the new one is in place.

Permission policy: published files are ``0o644`` and folders ``0o755`` less the process umask
(``mkstemp``/``mkdtemp`` create private ``0o600``/``0o700`` paths, which would lock other users
and services such as an MLflow server out of shared outputs).

Disk-full and other ``OSError``s while writing leave the previous output intact and re-raise
with the target named, plus a hint of how much space the folder has left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "published",
    "replace_dir",
    "staged_dir",
    "staged_file",
    "write_bytes",
    "write_json",
    "write_text",
]

# What this process published, in order: stage logs say where the outputs went.
_PUBLISHED: list[Path] = []


def published() -> list[Path]:
    """Files and folders this process has published so far (targets, in order)."""
    return list(_PUBLISHED)


def _record(target: Path, staged: Path | None = None) -> None:
    if staged is not None:  # files written inside a staged folder now live in `target`
        _PUBLISHED[:] = [p for p in _PUBLISHED if not p.is_relative_to(staged)]
    _PUBLISHED.append(target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Apply the shared permission policy to ``path`` (recursively for folders)."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o755 & ~mask)
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644 & ~mask)
    else:
        os.chmod(path, 0o644 & ~mask)


def _move(src: Path, dst: Path) -> None:
    # The project's only rename: atomic within one filesystem (temp paths are always siblings).
    os.replace(src, dst)


def _explain(err: OSError, target: Path) -> OSError:
    """The same error, naming the target; a full disk also says how much is left where."""
    if err.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(target.parent).free / 2**20
            hint = f"{free:.0f} MiB free on that filesystem"
        except OSError:
            hint = "free space unknown"
        msg = (
            f"no space left while writing {target} ({hint}); the previous version is intact."
            " Free space there (old runs/, cache/, .dvc/cache, mlruns/) and rerun."
        )
        return OSError(err.errno, msg)
    return OSError(err.errno, f"{err.strerror} while writing {target}")


@contextlib.contextmanager
def staged_file(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; publish it over ``target`` on success.

    On an exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish_mode(tmp)
        _move(tmp, target)
        _record(target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _explain(err, target) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (flushed to disk before the rename)."""
    target = Path(target)
    with staged_file(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return target


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, a trailing newline) atomically."""
    return write_text(target, json.dumps(obj, indent=indent) + "\n")


def replace_dir(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swap the finished folder ``staged`` in as ``target``, with rollback.

    ``os.replace`` cannot move a folder over a non-empty one, so an existing ``target`` is first
    moved aside, then the new one moved in; if that fails the old one is put back. The old copy
    is deleted only after the new folder is in place.
    """
    staged, target = Path(staged), Path(target)
    _publish_mode(staged)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        _move(target, aside / "d")
    try:
        _move(staged, target)
    except BaseException:
        if aside is not None:
            _move(aside / "d", target)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _record(target, staged)
    return target


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; swap it in on success.

    On an exception (disk full, a kill signal turned into an exception, a bug) the temporary
    folder is removed and ``target`` keeps its previous content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        replace_dir(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(err, target) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
