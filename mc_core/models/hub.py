"""Where a real base model comes from: a local folder or a Hugging Face id, pinned by content.

    rec = hub.resolve("llava-hf/llava-1.5-7b-hf")      # HF id: through the hub cache
    rec = hub.resolve("/data/ckpt/qwen2-vl")            # a local save_pretrained folder
    rec.to_dict()       # what tasks.base writes to models/base/<name>/resolved.json
    hub.locate(rec_dict) -> Path   # this machine's folder of those exact weights (verified)

The record is a DVC-tracked output, so it holds no machine path: the same weights give the
same bytes on any machine. It pins the weights by content: per file its size and SHA-256,
plus the snapshot commit for hub ids. Hashes are cheap to get: a hub snapshot file is a link
to a blob named by its SHA-256 (LFS files; small git files are hashed, they are small), and a
local folder is hashed once per (path, size, mtime_ns), memoised in ``$MC_CACHE/hashes.json``
(default ``~/.cache/metacompress``). A local folder's location is remembered in
``$MC_CACHE/locations.json`` under the record's fingerprint: that is how a later stage on
the same machine finds it again from the record alone.

Hub ids go through ``huggingface_hub.snapshot_download`` with the cache of ``HF_HUB_CACHE``
(else ``$HF_HOME/hub``); with ``HF_HUB_OFFLINE`` set nothing is downloaded (cached files only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mc_core import io

__all__ = [
    "Resolved",
    "cache_dir",
    "fingerprint",
    "hub_cache_dir",
    "locate",
    "offline",
    "remember",
    "resolve",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Weights of other frameworks: never read by from_pretrained here, not worth downloading.
_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resolved:
    """A resolved checkpoint: what it is and exactly which bytes (no machine paths).

    Attributes:
        kind: "hub" (an HF id through the hub cache) or "folder" (a plain local folder).
        source: the HF id, or the folder's name (its location is machine-local, see module).
        revision: the snapshot commit for hub ids; None for plain folders.
        family: the family descriptor's name (from config.json, ``families.for_config``).
        model_class: the transformers class that loads it.
        files: relative POSIX path -> ``{"size", "sha256"}``, sorted by path.
        path: this machine's folder (not part of the record).
    """

    kind: str
    source: str
    revision: str | None
    family: str
    model_class: str
    files: dict[str, dict[str, Any]]
    path: Path = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record (``resolved.json``): everything but the machine-local path."""
        d = asdict(self)
        d.pop("path")
        d["fingerprint"] = fingerprint(self.files)
        return d


def fingerprint(files: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of the file table's canonical JSON: one id for exactly these weights."""
    blob = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, not at import, so tests can set it)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cache_dir() -> Path:
    """This project's machine-local cache: ``MC_CACHE``, else ``~/.cache/metacompress``."""
    return Path(
        os.environ.get("MC_CACHE") or os.path.join("~", ".cache", "metacompress")
    ).expanduser()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a memo: missing or damaged means "not known yet"
    return data if isinstance(data, dict) else {}


def resolve(source: str, revision: str | None = None) -> Resolved:
    """Resolve ``source`` (anything ``from_pretrained`` takes) to a pinned record.

    Args:
        source: an existing local folder, or a Hugging Face id (``org/name``).
        revision: hub ids only: a branch, tag or commit (default: ``main``).

    Raises:
        ValueError: the folder is missing or has no config.json, its family is unknown, or
            the id is not in the hub cache while offline (the message says how to fetch it).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source={source!r}: expected an HF id or a local folder")
    folder = Path(source).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise ValueError(
                f"source={source!r} is a local folder: revision={revision!r} applies to hub ids"
            )
        rec = _record("folder", folder.name, None, folder.resolve(), memo=True)
        remember(rec)
        return rec
    # An HF id is "name" or "org/name"; anything else that is not a folder is a missing one.
    if source.startswith(("/", ".", "~")) or not _HUB_ID.match(source):
        raise ValueError(f"source={source!r}: no such folder (and not a Hugging Face id)")
    path = _snapshot(source, revision)
    return _record("hub", source, path.name, path, memo=False)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot folder of ``repo_id`` (downloaded first unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    rev = f" --revision {revision}" if revision else ""
    cache = hub_cache_dir()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline(),
            ignore_patterns=_IGNORE,
        )
    except LocalEntryNotFoundError:
        raise ValueError(
            f"source={repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
            f"{cache} and HF_HUB_OFFLINE is set: fetch it once on a machine with network, "
            f"without HF_HUB_OFFLINE: `hf download {repo_id}{rev}` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id}{rev}`), with the same HF_HOME / HF_HUB_CACHE"
        ) from None
    except HfHubHTTPError as err:
        raise ValueError(f"source={repo_id!r}: the Hugging Face hub refused it: {err}") from None
    return Path(path)


def _record(kind: str, source: str, revision: str | None, path: Path, *, memo: bool) -> Resolved:
    from mc_core.models import families

    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"source={source!r}: {config.name} missing (not a transformers model)")
    fam = families.for_config(config)  # ValueError naming the model_type and the families
    return Resolved(
        kind=kind,
        source=source,
        revision=revision,
        family=fam.name,
        model_class=fam.model_class.__name__,
        files=_files(path, memo=memo),
        path=path,
    )


def _files(root: Path, *, memo: bool) -> dict[str, dict[str, Any]]:
    """Every visible file under ``root`` (links followed): size and SHA-256, sorted by path."""
    hashes = _HashMemo(cache_dir() / "hashes.json") if memo else None
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Hidden entries are tool state (.git, huggingface's .cache), not the checkpoint.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            rel = f.relative_to(root).as_posix()
            out[rel] = {"size": f.stat().st_size, "sha256": _sha256(f, hashes)}
    if hashes is not None:
        hashes.save()
    return dict(sorted(out.items()))


def _sha256(f: Path, memo: _HashMemo | None) -> str:
    # A hub blob is named by its content's SHA-256 (LFS files): no need to read 15 GB again.
    if f.is_symlink():
        target = Path(os.readlink(f))
        if target.parent.name == "blobs" and _SHA256.match(target.name):
            return target.name
    if memo is not None:
        return memo.sha256(f)
    return _hash_file(f)


def _hash_file(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _HashMemo:
    """SHA-256 by (real path, size, mtime_ns): a big folder is hashed once per change."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = _read_json(path)
        self.dirty = False

    def sha256(self, f: Path) -> str:
        real = f.resolve()
        st = real.stat()
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.entries:
            self.entries[key] = _hash_file(real)
            self.dirty = True
        return self.entries[key]

    def save(self) -> None:
        if self.dirty:
            # Another process may have added entries meanwhile: merge, never drop theirs.
            self.entries = {**_read_json(self.path), **self.entries}
            io.write_json(self.path, self.entries, indent=None)
            self.dirty = False


def remember(rec: Resolved) -> None:
    """Note where this machine keeps a plain folder's weights (by fingerprint)."""
    if rec.kind != "folder":
        return
    index = cache_dir() / "locations.json"
    known = _read_json(index)
    fp = fingerprint(rec.files)
    if known.get(fp) != str(rec.path):
        io.write_json(index, {**known, fp: str(rec.path)})


def locate(record: dict[str, Any], *, where: str = "resolved.json") -> Path:
    """This machine's folder holding exactly the weights of ``record``, checked file by file.

    Raises:
        ValueError: the weights are not on this machine, or they changed since the record
            was written (names the files that differ).
    """
    kind, source = record.get("kind"), record.get("source")
    if kind == "hub":
        rec = resolve(source, record.get("revision"))
    elif kind == "folder":
        known = _read_json(cache_dir() / "locations.json")
        place = known.get(record.get("fingerprint") or fingerprint(record.get("files", {})))
        if place is None or not Path(place).is_dir():
            raise ValueError(
                f"{where}: the folder {source!r} with these weights is not known on this machine "
                f"(looked in {cache_dir() / 'locations.json'}): rerun the base stage here "
                "(`dvc repro -f -s base@<name>`) so it resolves `models.<name>.source` again"
            )
        rec = resolve(place)
    else:
        raise ValueError(f"{where}: kind={kind!r}: expected 'hub' or 'folder'")
    if kind == "hub" and rec.revision != record.get("revision"):
        raise ValueError(
            f"{where}: {source!r} resolved to revision {rec.revision}, "
            f"recorded {record['revision']}"
        )
    _same_files(record.get("files", {}), rec.files, where=where, path=rec.path)
    return rec.path


def _same_files(want: dict, have: dict, *, where: str, path: Path) -> None:
    changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if changed:
        shown = ", ".join(changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        )
        raise ValueError(
            f"{where}: the weights at {path} changed since they were recorded ({shown}): "
            "rerun the base stage (`dvc repro`) to record the new ones"
        )
