"""The frozen model's side of training, computed once: the target cache.

Everything the frozen model contributes is fixed while it is frozen, so it is computed once per
dialogue and kept in a `TargetCache`: the projector output `X` per image, its token contexts
(positions / grid), the text-side inputs, and the full model's answer-position log-probs
(`logits_to_keep` selects only those rows of the LM head), by default only their top-k and
tail mass (`TrainConfig.target_topk`, `losses.TopKTarget`: a real vocabulary's full rows do not
fit on disk for a training set), trained against with the bucketed KL (`losses.topk_kl`). The
cache does not depend on the rate: build it once (`build_target_cache`) and pass it to
`mc_core.training.loop.train` for every rate of an architecture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mc_core.compressors import TokenContext
from mc_core.compressors.base import PROMPT_FIELDS
from mc_core.data.images import as_rgb
from mc_core.inference.dialogue import collate, encode_dialogue, to_device
from mc_core.io import staged_dir
from mc_core.models.families import adapter_for
from mc_core.progress import progress as progress_bar
from mc_core.runtime import prepare_model, resolve_device
from mc_core.training.config import TrainConfig
from mc_core.training.entry import CacheEntry
from mc_core.training.losses import TopKTarget
from mc_core.training.store import MANIFEST, StoreWriter, TargetStore

__all__ = [
    "TARGETS_VERSION",
    "CacheEntry",
    "TargetCache",
    "build_target_cache",
    "load_target_cache",
    "save_target_cache",
    "target_cache_info",
]

# The version of what a cache holds and how it is computed. A saved cache records it (the
# pipeline keys its cache on it), so bump it with any change here, in the dialogue encoding or
# in the adapters that changes the entries: a stale cache is then rebuilt, not reused.
TARGETS_VERSION = 2  # 2: the sharded target store


def frozen_entries(*args, **kwargs) -> list[CacheEntry]:
    """`_target_entries` under inference mode (no autograd bookkeeping for the frozen model),
    its tensors turned into ordinary ones: the student step saves cached tokens and targets for
    its backward, which inference tensors refuse."""
    with torch.inference_mode():
        entries = _target_entries(*args, **kwargs)
    return _plain(entries)


def _plain(obj):
    """`obj` with every inference tensor inside (dataclasses, dicts, lists, tuples) copied."""
    if isinstance(obj, Tensor):
        if not obj.is_inference():
            return obj
        if obj.numel() and all(s == 0 for s in obj.stride()):  # a shape stub stays zero-memory
            return torch.zeros((), dtype=obj.dtype, device=obj.device).expand(obj.shape)
        return obj.clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, _plain(getattr(obj, f.name)))
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


@dataclass
class TargetCache:
    """Per-dialogue frozen-model outputs, in dataset order; independent of the rate.

    `entries`: a list in memory (`build_target_cache`) or a `TargetStore` read from disk per
    index (`load_target_cache`, `build_target_store`). `topk`: the k of every entry's
    `TopKTarget`, or None when the targets are full rows. `visual_tokens`: "recompute" when the
    entries hold no projector output (`recompute_tokens` fills it per step).
    """

    entries: Sequence[CacheEntry] = field(default_factory=list)
    needs: frozenset[str] = frozenset()
    build_s: float = 0.0
    topk: int | None = None
    visual_tokens: str = "store"

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self, i: int) -> tuple[int, int]:
        """Answer tokens and images of dialogue ``i`` (a step's loss weights), without reading
        a stored entry's tensors."""
        if isinstance(self.entries, TargetStore):
            return self.entries.counts(i)
        e = self.entries[i]
        return len(e.positions), len(e.contexts)

    def shape(self, i: int) -> tuple[int, int, list[int]]:
        """Answer tokens, full sequence length and each image's visual tokens of dialogue ``i``
        (what a step's memory depends on), without reading a stored entry's tensors."""
        if isinstance(self.entries, TargetStore):
            return self.entries.shape(i)
        e = self.entries[i]
        return len(e.positions), e.length, [len(t) for t in e.tokens]

    def step_shapes(self, kept) -> dict[str, Any]:
        """The shapes of the costliest step (`mc_core.training.memory.estimate`'s inputs): the
        longest compressed dialogue, the most answer tokens and images of one dialogue, and
        the largest image's visual tokens before and after compression (``kept(n)`` rows).

        Raises:
            ValueError: an in-memory cache without visual tokens (no shapes to read).
        """
        shapes = [self.shape(i) for i in range(len(self))]
        if not any(ns for _, _, ns in shapes):
            raise ValueError("the cache holds no visual tokens to read shapes from")
        n = max(max(ns) for _, _, ns in shapes if ns)
        return {
            "seq_len": max(length - sum(k - kept(k) for k in ns) for _, length, ns in shapes),
            "answer_tokens": max(t for t, _, _ in shapes),
            "images": max(len(ns) for _, _, ns in shapes),
            "visual_tokens": (n, kept(n)),
        }


def _row_images(row: dict[str, Any], where: str) -> list[Any]:
    image = row.get("image")
    if image is None:
        raise ValueError(f"{where}: no 'image' in the row")
    return list(image) if isinstance(image, list | tuple) else [image]


# Answer length limit of `targets="teacher"` generation: a real model's short answer ends with
# its end-of-turn token well before this; the cut only bounds a rambling one.
TEACHER_ANSWER_TOKENS = 16


def _encode_rows(
    processor, adapter, rows: Sequence[dict[str, Any]], where: str, model=None, targets="gold"
):
    images = [as_rgb(_row_images(row, where)) for row in rows]
    answers = [row["answers"] for row in rows]
    if targets == "teacher":
        # The frozen model's own greedy answers (all visual tokens, its own history), so the KL
        # covers exactly the tokens it would say, however many per turn.
        from mc_core.inference.engine import greedy_answers

        said = greedy_answers(
            model,
            processor,
            images,
            [row["questions"] for row in rows],
            max_new_tokens=TEACHER_ANSWER_TOKENS,
            adapter=adapter,
        )
        # An empty answer (EOS first) has no tokens to teacher-force: that turn keeps gold.
        answers = [
            [t or g for t, g in zip(ts, gs, strict=True)]
            for ts, gs in zip(said, answers, strict=True)
        ]
    elif targets != "gold":
        raise ValueError(f"train.targets={targets!r}: expected 'gold' or 'teacher'")
    out = []
    for row, ims, ans in zip(rows, images, answers, strict=True):
        inputs, positions = encode_dialogue(processor, ims, row["questions"], ans)
        out.append((inputs, positions))
    return out


def pad_id(processor) -> int:
    pad = processor.tokenizer.pad_token_id
    return int(pad if pad is not None else processor.tokenizer.eos_token_id)


@torch.no_grad()
def _target_entries(
    model, processor, adapter, rows, needs, device, where, topk: int | None = None, targets="gold"
) -> list[CacheEntry]:
    """Encode rows, run the vision tower once, the full model once (batched), return entries
    whose targets keep the top-`topk` log-probs (None: all); `targets` ("gold" / "teacher"):
    whose answers are teacher-forced (`TrainConfig.targets`)."""
    encoded = _encode_rows(processor, adapter, rows, where, model, targets)
    entries: list[CacheEntry] = []
    full_rows = []
    for inputs, positions in encoded:
        inputs = to_device(inputs, device, next(model.parameters()).dtype)
        tokens = adapter.visual_tokens(inputs)
        contexts = adapter.contexts(inputs, need=frozenset(needs) - PROMPT_FIELDS)
        base = {k: _shape_stub(v) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        full_rows.append(adapter.inputs_with(inputs, tokens))
        entries.append(
            CacheEntry(
                base=to_device(base, "cpu"),
                tokens=[t.detach().cpu() for t in tokens],
                contexts=[ctx_to(c, "cpu") for c in contexts],
                positions=positions,
                target=torch.empty(0),
                length=int(inputs["input_ids"].shape[1]),
            )
        )
    # P = I through inputs_with equals the untouched model (adapter contract), and skips a
    # second vision-tower pass.
    adapter.reset_state()
    batch, _ = collate(full_rows, pad_token_id=pad_id(processor), side="right")
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for i, e in enumerate(entries):
        mask[i, e.positions] = True
    logits = model(**batch, logits_to_keep=mask.to(device)).logits  # (sum T, V)
    logp = logits.float().log_softmax(-1).cpu()
    for e, part in zip(entries, logp.split([len(e.positions) for e in entries]), strict=True):
        e.target = part.clone() if topk is None else TopKTarget.from_logprobs(part, topk)
    return entries


def _check_topk(topk: Any, where: str) -> int | None:
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"{where}={topk!r}: expected an int >= 1 or None (full vocabulary)")
    return topk


def batch_target(entries: Sequence[CacheEntry], device) -> Tensor | TopKTarget:
    """The batch's targets as one [sum T, V] tensor or one `TopKTarget`, on `device`."""
    targets = [e.target for e in entries]
    if isinstance(targets[0], TopKTarget):
        return TopKTarget.cat(targets).to(device)
    return torch.cat(targets).to(device)


def _shape_stub(value):
    """A zero-memory stand-in of the same shape for a pixel tensor.

    Adapters read only the shapes of the pixels (to count images and tiles) once the visual
    tokens are given; `inputs_with` drops them. A stride-0 view keeps the cache small.
    """
    if not isinstance(value, Tensor):
        return value
    return torch.zeros((), dtype=value.dtype).expand(value.shape)


def ctx_to(ctx: TokenContext, device) -> TokenContext:
    kwargs = {
        f.name: (
            getattr(ctx, f.name).to(device)
            if isinstance(getattr(ctx, f.name), Tensor)
            else getattr(ctx, f.name)
        )
        for f in dataclasses.fields(ctx)
    }
    return TokenContext(**kwargs)


def dataset_rows(dataset, indices: Iterable[int]) -> list[dict[str, Any]]:
    from mc_core.data.schema import row

    return [row(dataset, i) for i in indices]


def build_target_cache(
    model,
    processor,
    dataset,
    *,
    needs: frozenset[str] = frozenset(),
    adapter=None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    progress: bool = True,
    topk: int | None = TrainConfig.model_fields["target_topk"].default,
    dtype: str | torch.dtype = "auto",
    targets: str = "gold",
) -> TargetCache:
    """Run the frozen model once over every dialogue of `dataset`.

    Args:
        model: the LVLM (frozen by this call; moved to `device`).
        processor: its processor.
        dataset: rows of the dialogue schema (`image`, `questions`, `answers`, ...).
        needs: extra token-context fields the compressor needs (`Compressor.needs`).
        adapter: the family adapter (default `adapter_for(model)`).
        batch_size: dialogues per full-model forward.
        device: see `TrainConfig.device`.
        progress: progress bar (a tqdm bar on a terminal, log lines elsewhere).
        topk: keep the top-k log-probs + tail mass per answer token (`TrainConfig.target_topk`,
            whose default this is); None keeps the whole vocabulary.
        dtype: the frozen model's dtype (`resolve_dtype`; see `TrainConfig.dtype`).
        targets: "gold" (teacher-force the dataset's answers) or "teacher" (the frozen model's
            own greedy answers, up to `TEACHER_ANSWER_TOKENS` per turn; `TrainConfig.targets`).

    Returns:
        The cache, in dataset order.
    """
    topk = _check_topk(topk, "build_target_cache: topk")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prepare_model(model, dev, dtype)
    adapter = adapter if adapter is not None else adapter_for(model)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to train on")
    t0 = time.perf_counter()
    cache = TargetCache(needs=frozenset(needs), topk=topk)
    bar = progress_bar(total=n, desc="target cache", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        cache.entries += frozen_entries(
            model,
            processor,
            adapter,
            dataset_rows(dataset, idx),
            cache.needs,
            dev,
            f"dataset rows {start}+",
            topk,
            targets=targets,
        )
        bar.update(len(idx))
    bar.close()
    cache.build_s = time.perf_counter() - t0
    return cache


def _description(cache: TargetCache, info: dict[str, Any] | None) -> dict[str, Any]:
    dtype = next((str(t.dtype) for e in cache.entries[:1] for t in e.tokens[:1]), None)
    return _describe(info, cache.needs, cache.topk, dtype)


def _describe(info, needs, topk, dtype) -> dict[str, Any]:
    """What a store is built from (its key): the caller's info, the context fields, k, the
    version of this module's computation and the dtype of the visual tokens."""
    out = {"info": info or {}, "needs": sorted(needs), "topk": topk}
    return {**out, "targets_version": TARGETS_VERSION, "dtype": dtype}


def save_target_cache(
    cache: TargetCache,
    path: str | os.PathLike,
    *,
    info: dict[str, Any] | None = None,
    shard_dialogues: int = TrainConfig.model_fields["shard_dialogues"].default,
) -> None:
    """Write an in-memory cache as a target store (`mc_core.training.store`) at `path`,
    replacing what is there (the new store is built beside it and swapped in).

    `info` (JSON) is stored as what the cache was built from, so a reader can refuse a cache of
    other inputs (`target_cache_info`).
    """
    with staged_dir(Path(path)) as tmp:
        desc = _description(cache, info)
        writer = StoreWriter(tmp, desc, n=len(cache), shard_dialogues=shard_dialogues)
        writer.add(cache.entries)
        writer.finish()


def target_cache_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `info` a store at `path` was saved with; None: no (finished) store there."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    manifest = json.loads(f.read_text())
    return manifest["description"].get("info", {}) if manifest.get("complete") else None


_ANY = object()  # load_target_cache's `topk` default: accept any k


def load_target_cache(path: str | os.PathLike, *, topk: Any = _ANY) -> TargetCache:
    """The target store at `path` as a cache whose entries are read from disk when indexed
    (no unpickling; host memory does not grow with the number of dialogues).

    Args:
        topk: when given, the k the cache must have been built with (None: full rows); a cache
            of another k raises ValueError (rebuild it with `build_target_cache(topk=...)`).
    """
    store = TargetStore(path)
    if topk is not _ANY and store.topk != topk:
        raise ValueError(
            f"{path}: target cache built with target_topk={store.topk!r}, this run wants "
            f"target_topk={topk!r}; rebuild it (build_target_cache(..., topk={topk!r}))"
        )
    mode = "store" if store.with_tokens else "recompute"
    return TargetCache(entries=store, needs=store.needs, topk=store.topk, visual_tokens=mode)


def build_target_store(
    model,
    processor,
    dataset,
    path: str | os.PathLike,
    *,
    info: dict[str, Any] | None = None,
    needs: frozenset[str] = frozenset(),
    adapter=None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    progress: bool = True,
    topk: int | None = TrainConfig.model_fields["target_topk"].default,
    dtype: str | torch.dtype = "auto",
    targets: str = "gold",
    visual_tokens: str = "store",
    shard_dialogues: int = TrainConfig.model_fields["shard_dialogues"].default,
) -> TargetCache:
    """`build_target_cache` straight into a target store at `path`, one shard at a time.

    Host memory holds one shard's entries, whatever the size of `dataset`. A build that was
    interrupted resumes at its first unfinished shard; a finished store of the same inputs is
    returned as it is; a store of other inputs at `path` is refused (ValueError). The arguments
    are `build_target_cache`'s, plus `info` (recorded, part of the store's key),
    `visual_tokens` ("store" or "recompute": leave the projector output out) and
    `shard_dialogues`. Batches never straddle a shard, so a resumed store equals an
    uninterrupted one bit for bit.

    Returns:
        The store as a cache whose entries are read from disk when indexed.
    """
    topk = _check_topk(topk, "build_target_store: topk")
    if visual_tokens not in ("store", "recompute"):
        raise ValueError(f"train.visual_tokens={visual_tokens!r}: expected 'store' or 'recompute'")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prepare_model(model, dev, dtype)
    adapter = adapter if adapter is not None else adapter_for(model)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to train on")
    t0 = time.perf_counter()
    desc = _describe(info, needs, topk, str(next(model.parameters()).dtype))
    writer = StoreWriter(
        path, desc, n=n, shard_dialogues=shard_dialogues, with_tokens=visual_tokens == "store"
    )
    bar = progress_bar(total=n, initial=writer.done, desc="target store", disable=not progress)
    for shard in range(writer.done, n, shard_dialogues):
        for start in range(shard, min(n, shard + shard_dialogues), batch_size):
            idx = range(start, min(n, shard + shard_dialogues, start + batch_size))
            rows = dataset_rows(dataset, idx)
            where = f"dataset rows {start}+"
            writer.add(
                frozen_entries(
                    model,
                    processor,
                    adapter,
                    rows,
                    frozenset(needs),
                    dev,
                    where,
                    topk,
                    targets=targets,
                )
            )
            bar.update(len(idx))
    bar.close()
    writer.finish()
    cache = load_target_cache(path, topk=topk)
    cache.build_s = time.perf_counter() - t0
    return cache


def recompute_tokens(model, processor, adapter, entries, rows, device) -> None:
    """Fill the projector output of store entries built with ``visual_tokens="recompute"``:
    the frozen vision tower and projector run again on each row's images (the same inputs as
    when the store was built, so the same tokens)."""
    encoded = _encode_rows(processor, adapter, rows, "recompute_tokens")
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for e, (inputs, _) in zip(entries, encoded, strict=True):
            tokens = adapter.visual_tokens(to_device(inputs, device, dtype))
            if len(tokens) != len(e.contexts):
                raise ValueError(
                    f"recompute_tokens: {len(tokens)} images in the row, the store entry has "
                    f"{len(e.contexts)}: the dataset is not the one the store was built on"
                )
            e.tokens = [t.detach().cpu().clone() for t in tokens]
