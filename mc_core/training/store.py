"""The target store: the frozen model's side of training on disk, in shards read per step.

At LLaVA-1.5 size the projector output of one image is 576 x 4096 values; for 20k dialogues
that is about 94 GB in bf16, more than a host keeps in memory. The store keeps every
`CacheEntry` in safetensors shards of `shard_dialogues` dialogues and reads a step's entries
from them through memory maps (`safe_open`), so host memory holds one step's entries and a few
open shards, whatever the number of dialogues.

Layout of a store directory:

- ``store.json``: the manifest: format version, the store's key (a hash of what it was built
  from: the caller's `info`, the context fields, top-k, visual-token mode, dtype, shard size,
  dialogue count) and, per finished shard, its file, byte size and the per-dialogue counts a
  step needs before reading tensors (answer tokens, images, sequence length, visual tokens).
- ``shard-00000.safetensors``, ...: the tensors of each dialogue, keyed ``<i>.<field>``, and in
  the safetensors header the store key and each entry's non-tensor fields.

Shards are written to a temporary name and renamed (atomic), and the manifest is rewritten
(atomically) after each one: a build that is killed resumes at the first shard the manifest
does not list. A shard whose size differs from the manifest's (truncated) or whose header
carries another store's key (copied from another model or config) is refused with an error
naming the shard.

``visual_tokens="recompute"`` leaves the projector output out (the training loop runs the
frozen vision tower again per step: `mc_core.training.targets.recompute_tokens`); the store then
holds only the small targets and contexts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mc_core.compressors import TokenContext
from mc_core.io import staged_file, write_json
from mc_core.training.entry import CacheEntry
from mc_core.training.losses import TopKTarget

__all__ = ["STORE_VERSION", "StoreWriter", "TargetStore", "entry_record", "store_key"]

STORE_VERSION = 1
MANIFEST = "store.json"
_OPEN_SHARDS = 4  # memory maps kept open: a step's random batch revisits few shards


def store_key(description: dict[str, Any]) -> str:
    """The hash that ties shards to their store (16 hex digits of a canonical JSON)."""
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _is_stub(v: Tensor) -> bool:
    return v.numel() > 0 and all(s == 0 for s in v.stride())


def entry_record(e, i: int, *, with_tokens: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors (keyed ``<i>.<field>``) and JSON fields of one `CacheEntry`."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"length": e.length, "base": [], "stubs": {}, "ctx": []}
    meta["n_images"] = len(e.contexts)
    for k, v in e.base.items():
        if isinstance(v, Tensor) and _is_stub(v):  # pixels: only their shape is kept
            meta["stubs"][k] = [list(v.shape), str(v.dtype).removeprefix("torch.")]
        elif isinstance(v, Tensor):
            tensors[f"{i}.base.{k}"] = v.contiguous()
            meta["base"].append(k)
    if with_tokens:
        for j, t in enumerate(e.tokens):
            tensors[f"{i}.tok.{j}"] = t.contiguous()
    for j, c in enumerate(e.contexts):
        cm: dict[str, Any] = {"grid": list(c.grid) if c.grid is not None else None, "t": []}
        for f in dataclasses.fields(c):
            v = getattr(c, f.name)
            if isinstance(v, Tensor):
                tensors[f"{i}.ctx.{j}.{f.name}"] = v.contiguous()
                cm["t"].append(f.name)
        meta["ctx"].append(cm)
    tensors[f"{i}.pos"] = e.positions.contiguous()
    if isinstance(e.target, TopKTarget):
        for name in ("values", "index", "tail"):
            tensors[f"{i}.target.{name}"] = getattr(e.target, name).contiguous()
    else:
        tensors[f"{i}.target"] = e.target.contiguous()
    return tensors, meta


def _entry(get, i: int, meta: dict[str, Any], topk: int | None, with_tokens: bool):
    contexts = []
    for j, cm in enumerate(meta["ctx"]):
        kw = {name: get(f"{i}.ctx.{j}.{name}") for name in cm["t"]}
        contexts.append(TokenContext(grid=tuple(cm["grid"]) if cm["grid"] else None, **kw))
    base = {k: get(f"{i}.base.{k}") for k in meta["base"]}
    for k, (shape, dtype) in meta["stubs"].items():
        base[k] = torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
    if topk is None:
        target = get(f"{i}.target")
    else:
        target = TopKTarget(*(get(f"{i}.target.{k}") for k in ("values", "index", "tail")))
    n = meta["n_images"]
    tokens = [get(f"{i}.tok.{j}") for j in range(n)] if with_tokens else []
    return CacheEntry(
        base=base,
        tokens=tokens,
        contexts=contexts,
        positions=get(f"{i}.pos"),
        target=target,
        length=meta["length"],
    )


def _counts(e) -> list[int]:
    """answer tokens, images, full sequence length, then each image's visual tokens."""
    return [len(e.positions), len(e.contexts), int(e.length), *(int(len(t)) for t in e.tokens)]


class StoreWriter:
    """Writes (or resumes writing) a store: `add` entries in dataset order, then `finish`.

    Args:
        path: the store directory (created).
        description: what the store is built from; its hash is the store key. A store at
            `path` with another key is refused (ValueError naming both).
        n: the number of dialogues the finished store holds.
        shard_dialogues: dialogues per shard.
        with_tokens: keep the projector output (False: ``visual_tokens="recompute"``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        description: dict[str, Any],
        *,
        n: int,
        shard_dialogues: int,
        with_tokens: bool = True,
    ):
        self.path = Path(path)
        shape = {"n": n, "shard_dialogues": shard_dialogues, "with_tokens": with_tokens}
        self.key = store_key({**description, **shape, "version": STORE_VERSION})
        self.n, self.size, self.with_tokens = n, shard_dialogues, with_tokens
        self.manifest = {"version": STORE_VERSION, "key": self.key, **shape}
        self.manifest.update(description=description, shards=[], complete=False)
        old = self._existing()
        if old is not None:
            self.manifest["shards"] = old
        self.path.mkdir(parents=True, exist_ok=True)
        self._pending: list = []

    def _existing(self) -> list[dict[str, Any]] | None:
        """The finished shards of an interrupted build of this same store (None: none)."""
        f = self.path / MANIFEST
        if not f.is_file():
            return None
        have = json.loads(f.read_text())
        if have.get("key") != self.key:
            raise ValueError(
                f"{self.path}: a target store of other inputs (key {have.get('key')}, built from "
                f"{have.get('description')}) is there; this run's key is {self.key}: delete the "
                "directory or choose another path"
            )
        kept = []
        for rec in have["shards"]:  # a shard missing or cut short since is built again
            f = self.path / rec["file"]
            if not f.is_file() or f.stat().st_size != rec["bytes"]:
                break
            kept.append(rec)
        return kept

    @property
    def done(self) -> int:
        """Dialogues already in finished shards (a resumed build starts here)."""
        return sum(len(r["counts"]) for r in self.manifest["shards"])

    def add(self, entries: Sequence) -> None:
        """Append entries (in dataset order, from `done` on); full shards are written."""
        self._pending += list(entries)
        while len(self._pending) >= self.size:
            self._write(self._pending[: self.size])
            self._pending = self._pending[self.size :]

    def finish(self) -> None:
        """Write the last partial shard and mark the store complete."""
        if self._pending:
            self._write(self._pending)
            self._pending = []
        if self.done != self.n:
            raise ValueError(f"{self.path}: store holds {self.done} dialogues, expected {self.n}")
        self.manifest["complete"] = True
        write_json(self.path / MANIFEST, self.manifest, indent=None)

    def _write(self, entries: list) -> None:
        k = len(self.manifest["shards"])
        tensors, metas = {}, []
        for i, e in enumerate(entries):
            t, m = entry_record(e, i, with_tokens=self.with_tokens)
            tensors.update(t)
            metas.append(m)
        final = self.path / shard_name(k)
        header = {"store_key": self.key, "shard": str(k), "entries": json.dumps(metas)}
        with staged_file(final) as tmp:  # a failed or killed write never publishes a shard
            save_file(tensors, str(tmp), metadata=header)
        rec = {"file": final.name, "bytes": final.stat().st_size}
        rec["counts"] = [_counts(e) for e in entries]
        self.manifest["shards"].append(rec)
        write_json(self.path / MANIFEST, self.manifest, indent=None)


class TargetStore(Sequence):
    """A finished store, read lazily: ``store[i]`` is dialogue i's `CacheEntry` (its tensors
    copied out of the shard's memory map); ``counts(i)`` reads no tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        f = self.path / MANIFEST
        if not f.is_file():
            raise ValueError(f"{self.path}: no {MANIFEST} (not a target store)")
        self.manifest = json.loads(f.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.path}: target store was not finished (an interrupted build)")
        if self.manifest.get("version") != STORE_VERSION:
            raise ValueError(
                f"{self.path}: target store format {self.manifest.get('version')}, this code "
                f"reads {STORE_VERSION}: rebuild it"
            )
        self.key = self.manifest["key"]
        self.size = int(self.manifest["shard_dialogues"])
        self.with_tokens = bool(self.manifest["with_tokens"])
        desc = self.manifest["description"]
        self.topk, self.needs = desc.get("topk"), frozenset(desc.get("needs", ()))
        self._counts = [c for rec in self.manifest["shards"] for c in rec["counts"]]
        self._open: OrderedDict[int, tuple[Any, list]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def counts(self, i: int) -> tuple[int, int]:
        """Answer tokens and images of dialogue ``i``."""
        c = self._counts[i]
        return c[0], c[1]

    def shape(self, i: int) -> tuple[int, int, list[int]]:
        """answer tokens, full sequence length and each image's visual tokens of dialogue i."""
        c = self._counts[i]
        return c[0], c[2], c[3:]

    def _shard(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        rec = self.manifest["shards"][k]
        f = self.path / rec["file"]
        if not f.is_file() or f.stat().st_size != rec["bytes"]:
            have = f.stat().st_size if f.is_file() else "missing"
            raise ValueError(
                f"{f}: target store shard is {have} bytes, the manifest says {rec['bytes']} "
                f"(truncated or replaced): delete {self.path} to rebuild the store"
            )
        try:
            handle = safe_open(str(f), framework="pt")
            meta = handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{f}: unreadable target store shard ({err}): delete {self.path} to rebuild it"
            ) from None
        if meta.get("store_key") != self.key:
            raise ValueError(
                f"{f}: shard of another target store (key {meta.get('store_key')}, this store's "
                f"is {self.key}: another model or config); delete {self.path} to rebuild it"
            )
        self._open[k] = (handle, json.loads(meta["entries"]))
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return self._open[k]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"dialogue {i} of a store of {len(self)}")
        i %= len(self)
        handle, metas = self._shard(i // self.size)
        local = i % self.size
        # get_tensor copies out of the memory map: the entry outlives the closed shard.
        return _entry(handle.get_tensor, local, metas[local], self.topk, self.with_tokens)
