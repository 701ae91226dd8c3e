"""Training a compressor against the frozen LVLM (the MetaCompress recipe).

Loss per batch of gold 3-turn dialogues (teacher forcing, one pass per dialogue), computed by
``mc_core.training.losses.total_loss``:

    KL(p_full || p_comp) over every answer token of every turn
      + lambda_ent * mean row entropy of P + lambda_col * max column sum of P

The distillation target is the same frozen LVLM with all visual tokens. Its answer positions
and the compressed model's are aligned from the end of each sequence
(``mc_core.training.losses.align_from_end``: they differ by n - m visual tokens).

Everything the frozen model contributes is fixed while it is frozen, so it is computed once per
dialogue and kept in a `TargetCache`: the projector output `X` per image, its token contexts
(positions / grid), the text-side inputs, and the full model's answer-position log-probs
(`logits_to_keep` selects only those rows of the LM head), by default only their top-k and
tail mass (`TrainConfig.target_topk`, `losses.TopKTarget`: a real vocabulary's full rows do not
fit on disk for a training set), trained against with the bucketed KL (`losses.topk_kl`). Each
step then runs only the compressor and the compressed forward. The cache does not depend on the
rate: build it once (`build_target_cache`) and pass it to `train` for every rate of an
architecture.

Training state (compressor weights, optimizer, step, RNG) is checkpointed atomically every
`checkpoint_every` steps into `out_dir`; calling `train` again with the same arguments resumes
from it, and the batch order is a pure function of (seed, epoch), so a resumed run ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mc_core.compressors import Compressor, TokenContext, build
from mc_core.data.images import as_rgb
from mc_core.inference.conversation import reset_state, token_dim
from mc_core.inference.dialogue import collate, encode_dialogue, to_device
from mc_core.io import staged_dir, staged_file, write_json
from mc_core.models.families import adapter_for
from mc_core.progress import progress as progress_bar
from mc_core.training import distributed
from mc_core.training.config import TrainConfig
from mc_core.training.losses import TopKTarget, align_from_end, total_loss

__all__ = [
    "CacheEntry",
    "TargetCache",
    "TrainConfig",
    "build_target_cache",
    "load_target_cache",
    "prepare_model",
    "resolve_device",
    "save_target_cache",
    "student_logits",
    "target_cache_info",
    "train",
]

Callback = Callable[[int, dict[str, float]], None]
_STATE_JSON = "train_state.json"


# ---------------------------------------------------------------------------------------------
# Device and model preparation


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA raises ValueError.

    Under torchrun a CUDA device without an index is this process's ``cuda:LOCAL_RANK``: one
    GPU per rank.
    """
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The frozen model's dtype: 'auto' -> bfloat16 on CUDA (half the weight and activation
    memory of float32, native on Ampere+), float32 on CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"train.dtype={dtype!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'"
        )
    return getattr(torch, dtype)


def prepare_model(model, device: torch.device, dtype: str | torch.dtype = "auto"):
    """Freeze the LVLM (eval, no gradients), cast it to `dtype` (`resolve_dtype`) and move it;
    on CUDA use SDPA attention (fused kernels: no [L, L] attention matrix kept for backward)."""
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=resolve_dtype(dtype, device))
    if device.type == "cuda":
        # Classes without the setter keep what their config chose.
        with contextlib.suppress(AttributeError, ValueError):
            model.set_attn_implementation("sdpa")
    return model


def _frozen_entries(*args, **kwargs) -> list[CacheEntry]:
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


# ---------------------------------------------------------------------------------------------
# The target cache


@dataclass
class CacheEntry:
    """What the frozen model gives for one dialogue (all on CPU).

    Attributes:
        base: the processor's inputs for the full gold dialogue (batch of one, n placeholders
            per image); pixel tensors are zero-memory stubs of their shape.
        tokens: projector output per image, `[n_i, d]`.
        contexts: `TokenContext` per image.
        positions: positions of the answer tokens in the full sequence, `[T]`.
        target: the distillation target, the full model's log-probs at those positions: all of
            them, `[T, V]` float32, or their top-k and tail mass (`TopKTarget`).
        length: full sequence length.
    """

    base: dict[str, Any]
    tokens: list[Tensor]
    contexts: list[TokenContext]
    positions: Tensor
    target: Tensor | TopKTarget
    length: int


@dataclass
class TargetCache:
    """Per-dialogue frozen-model outputs, in dataset order; independent of the rate.

    `topk`: the k of every entry's `TopKTarget`, or None when the targets are full rows.
    """

    entries: list[CacheEntry] = field(default_factory=list)
    needs: frozenset[str] = frozenset()
    build_s: float = 0.0
    topk: int | None = None

    def __len__(self) -> int:
        return len(self.entries)


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
        from mc_core.inference.conversation import greedy_answers

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


def _pad_id(processor) -> int:
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
        contexts = adapter.contexts(inputs, need=frozenset(needs) - {"prompt_attention"})
        base = {k: _shape_stub(v) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        full_rows.append(adapter.inputs_with(inputs, tokens))
        entries.append(
            CacheEntry(
                base=to_device(base, "cpu"),
                tokens=[t.detach().cpu() for t in tokens],
                contexts=[_ctx_to(c, "cpu") for c in contexts],
                positions=positions,
                target=torch.empty(0),
                length=int(inputs["input_ids"].shape[1]),
            )
        )
    # P = I through inputs_with equals the untouched model (adapter contract), and skips a
    # second vision-tower pass.
    reset_state(adapter)
    batch, _ = collate(full_rows, pad_token_id=_pad_id(processor), side="right")
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


def _batch_target(entries: Sequence[CacheEntry], device) -> Tensor | TopKTarget:
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


def _ctx_to(ctx: TokenContext, device) -> TokenContext:
    kwargs = {
        f.name: (
            getattr(ctx, f.name).to(device)
            if isinstance(getattr(ctx, f.name), Tensor)
            else getattr(ctx, f.name)
        )
        for f in dataclasses.fields(ctx)
    }
    return TokenContext(**kwargs)


def _rows(dataset, indices: Iterable[int]) -> list[dict[str, Any]]:
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
        cache.entries += _frozen_entries(
            model,
            processor,
            adapter,
            _rows(dataset, idx),
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


def save_target_cache(
    cache: TargetCache, path: str | os.PathLike, *, info: dict[str, Any] | None = None
) -> None:
    """Write the cache as safetensors + JSON into the directory `path` (atomically).

    `info` (JSON) is stored in `cache.json` as what the cache was built from, so a reader can
    refuse a cache of other inputs (`target_cache_info`).
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    meta: list[dict[str, Any]] = []
    for i, e in enumerate(cache.entries):
        m: dict[str, Any] = {
            "length": e.length,
            "base": [],
            "stubs": {},
            "n_images": len(e.tokens),
            "ctx": [],
        }
        for k, v in e.base.items():
            if isinstance(v, Tensor) and v.numel() > 0 and all(s == 0 for s in v.stride()):
                m["stubs"][k] = [list(v.shape), str(v.dtype).removeprefix("torch.")]
            elif isinstance(v, Tensor):
                tensors[f"{i}.base.{k}"] = v.contiguous()
                m["base"].append(k)
        for j, t in enumerate(e.tokens):
            tensors[f"{i}.tok.{j}"] = t.contiguous()
        for j, c in enumerate(e.contexts):
            cm: dict[str, Any] = {"grid": list(c.grid) if c.grid is not None else None, "t": []}
            for f in dataclasses.fields(c):
                v = getattr(c, f.name)
                if isinstance(v, Tensor):
                    tensors[f"{i}.ctx.{j}.{f.name}"] = v.contiguous()
                    cm["t"].append(f.name)
            m["ctx"].append(cm)
        tensors[f"{i}.pos"] = e.positions.contiguous()
        if isinstance(e.target, TopKTarget):
            tensors[f"{i}.target.values"] = e.target.values.contiguous()
            tensors[f"{i}.target.index"] = e.target.index.contiguous()
            tensors[f"{i}.target.tail"] = e.target.tail.contiguous()
        else:
            tensors[f"{i}.target"] = e.target.contiguous()
        meta.append(m)
    with staged_dir(path) as tmp:
        save_file(tensors, str(tmp / "cache.safetensors"))
        write_json(
            tmp / "cache.json",
            {"needs": sorted(cache.needs), "topk": cache.topk, "info": info or {}, "entries": meta},
            indent=None,
        )


def target_cache_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `info` a cache at `path` was saved with ({} before it was recorded); None: no cache."""
    f = Path(path) / "cache.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("info", {})


_ANY = object()  # load_target_cache's `topk` default: accept any k


def load_target_cache(path: str | os.PathLike, *, topk: Any = _ANY) -> TargetCache:
    """Read a cache written by `save_target_cache` (no unpickling).

    Args:
        topk: when given, the k the cache must have been built with (None: full rows); a cache
            of another k raises ValueError (rebuild it with `build_target_cache(topk=...)`).
    """
    path = Path(path)
    if not (path / "cache.json").is_file():
        raise ValueError(f"{path}: no cache.json (not a target cache)")
    info = json.loads((path / "cache.json").read_text())
    built = info.get("topk")  # absent: written before top-k targets existed, full rows
    if topk is not _ANY and built != topk:
        raise ValueError(
            f"{path}: target cache built with target_topk={built!r}, this run wants "
            f"target_topk={topk!r}; rebuild it (build_target_cache(..., topk={topk!r}))"
        )
    tensors = load_file(str(path / "cache.safetensors"))
    cache = TargetCache(needs=frozenset(info["needs"]), topk=built)
    for i, m in enumerate(info["entries"]):
        contexts = []
        for j, cm in enumerate(m["ctx"]):
            kw = {name: tensors[f"{i}.ctx.{j}.{name}"] for name in cm["t"]}
            contexts.append(TokenContext(grid=tuple(cm["grid"]) if cm["grid"] else None, **kw))
        base = {k: tensors[f"{i}.base.{k}"] for k in m["base"]}
        for k, (shape, dtype) in m.get("stubs", {}).items():
            base[k] = torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
        cache.entries.append(
            CacheEntry(
                base=base,
                tokens=[tensors[f"{i}.tok.{j}"] for j in range(m["n_images"])],
                contexts=contexts,
                positions=tensors[f"{i}.pos"],
                target=_read_target(tensors, i, built),
                length=m["length"],
            )
        )
    return cache


def _read_target(tensors: dict[str, Tensor], i: int, topk: int | None) -> Tensor | TopKTarget:
    if topk is None:
        return tensors[f"{i}.target"]
    return TopKTarget(*(tensors[f"{i}.target.{k}"] for k in ("values", "index", "tail")))


# ---------------------------------------------------------------------------------------------
# The student


def student_logits(
    model, adapter, compressor, entries: Sequence[CacheEntry], *, pad_token_id: int, device
) -> tuple[Tensor, list[Tensor]]:
    """Compressed forward over cached dialogues: answer logits `[sum T, V]` and every P.

    The compressed answer positions are the full ones shifted by the visual tokens removed
    before them (`losses.align_from_end`).
    """
    rows, ps = [], []
    dtype = next(model.parameters()).dtype
    for e in entries:
        tokens = [t.to(device=device, dtype=torch.float32) for t in e.tokens]
        ys, p = compressor(tokens, [_ctx_to(c, device) for c in e.contexts])
        ps += p
        base = to_device(e.base, device, dtype)
        rows.append(adapter.inputs_with(base, [y.to(dtype) for y in ys], P=p))
    reset_state(adapter)
    batch, _ = collate(rows, pad_token_id=pad_token_id, side="right")
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for i, (e, r) in enumerate(zip(entries, rows, strict=True)):
        mask[i, align_from_end(e.positions, e.length, r["input_ids"].shape[1])] = True
    logits = model(**batch, logits_to_keep=mask.to(device)).logits  # (sum T, V)
    return logits, ps


# ---------------------------------------------------------------------------------------------
# Checkpointing


def _save_state(out_dir: Path, compressor, opt, step: int, info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"gen.{k}": v.detach().cpu().contiguous() for k, v in compressor.state_dict().items()
    }
    params = list(compressor.parameters())
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.momentum.{i}"] = buf.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"state-{step:08d}.safetensors"
    with staged_file(out_dir / name) as tmp:
        save_file(tensors, str(tmp))
    # The JSON is the commit point: it names the tensor file of the last complete checkpoint.
    write_json(out_dir / _STATE_JSON, {**info, "step": step, "file": name}, indent=1)
    for old in out_dir.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_state(out_dir: Path, compressor, opt, expect: dict[str, Any]) -> tuple[int, dict]:
    try:
        info = json.loads((out_dir / _STATE_JSON).read_text())
        tensors = load_file(str(out_dir / info["file"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # by hand
        raise ValueError(
            f"{out_dir}: unreadable training state ({type(err).__name__}: {err});"
            f" delete that folder to train from the start"
        ) from None
    for key, value in expect.items():
        if info.get(key) != value:
            raise ValueError(
                f"{out_dir / _STATE_JSON}: checkpoint has {key}={info.get(key)!r}, this run "
                f"{value!r}; resume with the same settings or use another out_dir"
            )
    compressor.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gen.")})
    for i, p in enumerate(compressor.parameters()):
        buf = tensors.get(f"opt.momentum.{i}")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(p.device).clone()
    torch.set_rng_state(tensors["rng.torch"])
    return int(info["step"]), info


# ---------------------------------------------------------------------------------------------
# The loop


def _order(n: int, seed: int, epoch: int) -> Tensor:
    # A pure function of (seed, epoch): resuming mid-epoch sees the same batches.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train(
    cfg: TrainConfig,
    model,
    processor,
    dataset,
    *,
    rate: float,
    out_dir: str | os.PathLike | None = None,
    callbacks: Sequence[Callback] | None = None,
    cache: TargetCache | None = None,
    adapter=None,
) -> Compressor:
    """Train a compressor for `rate` on `dataset` against the frozen `model`.

    Args:
        cfg: the run's settings (`cfg.method` and `cfg.compressor_kwargs` choose the method).
        model: the LVLM; frozen (`eval`, `requires_grad_(False)`) and moved to the device.
        processor: its processor.
        dataset: dialogue rows (schema of `mc_core.data.schema`).
        rate: reduction rate in (0, 1).
        out_dir: where training state is checkpointed; an existing checkpoint there is resumed.
            None: no checkpoints.
        callbacks: called as `cb(step, metrics)` every `cfg.log_every` steps and at the end;
            `metrics` holds loss, kl, entropy, collapse, grad_norm, epoch, samples_per_s (of the
            whole batch, the same on every rank of a process group: give side effects to rank 0).
        cache: a `TargetCache` of this model on `dataset` (built here when None and
            `cfg.cache_targets`).
        adapter: the family adapter (default `adapter_for(model)`).

    Under a ``torch.distributed`` process group (``mc_core.training.distributed``) every rank calls
    this
    with the same arguments: each step's batch is split across the ranks, their gradients are
    summed, and every replica takes the step of one process on the whole batch (up to float
    summation order). Only rank 0 writes checkpoints to `out_dir`; all ranks resume from it.

    Returns:
        The trained compressor (float32, eval mode, on the training device).

    Raises:
        ValueError: bad rate, empty dataset, cache of another size or target_topk, or a
            checkpoint in `out_dir` written with other settings.
        RuntimeError: the loss or gradient became NaN/inf, or the loss exploded.
    """
    run = _Run.start(cfg, model, processor, dataset, rate=rate, cache=cache, adapter=adapter)
    info = {"config": cfg.fingerprint(), "rate": float(rate), "dataset_size": run.n}
    step, first_loss = 0, None
    state_dir = Path(out_dir) if out_dir is not None else None
    if state_dir is not None and (state_dir / _STATE_JSON).is_file():
        step, saved = _load_state(state_dir, run.compressor, run.opt, info)
        first_loss = saved.get("first_loss")
    if run.world > 1:  # a rank that missed the checkpoint (out_dir not shared) would deadlock
        distributed.agree(step, "the step to resume from (is out_dir shared?)", run.device)
    callbacks = list(callbacks or [])
    bar = progress_bar(
        total=run.total,
        initial=step,
        desc=f"train r={rate}",
        disable=not cfg.progress or run.rank != 0,
    )
    t_start, samples = time.perf_counter(), 0
    while step < run.total:
        epoch, k = divmod(step, run.steps_per_epoch)
        idx = _order(run.n, cfg.seed, epoch)[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        metrics = run.step(idx.tolist(), step, first_loss)
        first_loss = metrics["loss"] if first_loss is None else first_loss
        step += 1
        samples += len(idx)
        bar.update(1)
        metrics["epoch"] = float(epoch)
        metrics["samples_per_s"] = samples / max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}")
        if step % cfg.log_every == 0 or step == run.total:
            for cb in callbacks:
                cb(step, metrics)
        saving = state_dir is not None and run.rank == 0  # the replicas are identical
        if saving and (step % cfg.checkpoint_every == 0 or step == run.total):
            _save_state(
                state_dir, run.compressor, run.opt, step, {**info, "first_loss": first_loss}
            )
    bar.close()
    if run.world > 1:  # rank 0's last checkpoint is on disk before any rank resumes from it
        distributed.barrier()
    return run.compressor.eval()


@dataclass
class _Run:
    """What one training run holds between steps: the frozen model, compressor, optimizer."""

    cfg: TrainConfig
    model: Any
    processor: Any
    dataset: Any
    adapter: Any
    compressor: Compressor
    opt: torch.optim.Optimizer
    params: list[Tensor]
    cache: TargetCache | None
    device: torch.device
    pad_id: int
    n: int
    steps_per_epoch: int
    total: int
    rank: int = 0
    world: int = 1

    @classmethod
    def start(
        cls,
        cfg: TrainConfig,
        model,
        processor,
        dataset,
        *,
        rate: float,
        cache: TargetCache | None,
        adapter,
    ) -> _Run:
        """Freeze the model, build the compressor and optimizer, check or build the cache."""
        device = resolve_device(cfg.device)
        prepare_model(model, device, cfg.dtype)
        adapter = adapter if adapter is not None else adapter_for(model)
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty: nothing to train on")
        torch.manual_seed(cfg.seed)
        compressor = build(cfg.method, rate=rate, dim=token_dim(model), **cfg.build_kwargs())
        if not compressor.trainable:
            raise ValueError(f"train.method={cfg.method!r} has no trainable parameters")
        compressor = compressor.float().to(device).train()
        params = [p for p in compressor.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        if cache is None and cfg.cache_targets:
            cache = build_target_cache(
                model,
                processor,
                dataset,
                needs=compressor.needs,
                adapter=adapter,
                batch_size=cfg.target_batch,
                device=device,
                progress=cfg.progress,
                topk=cfg.target_topk,
                dtype=cfg.dtype,
                targets=cfg.targets,
            )
        _check_cache(cache, n, compressor.needs, cfg.method, cfg.target_topk)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        return cls(
            cfg,
            model,
            processor,
            dataset,
            adapter,
            compressor,
            opt,
            params,
            cache,
            device,
            _pad_id(processor),
            n,
            steps_per_epoch,
            total,
            *distributed.world(),
        )

    def entries(self, idx: list[int]) -> list[CacheEntry]:
        """The batch's cached entries, or freshly computed ones when caching is off."""
        if self.cache is not None:
            return [self.cache.entries[i] for i in idx]
        return _frozen_entries(
            self.model,
            self.processor,
            self.adapter,
            _rows(self.dataset, idx),
            self.compressor.needs,
            self.device,
            f"dataset rows {idx[:4]}",
            self.cfg.target_topk,
            targets=self.cfg.targets,
        )

    def step(self, idx: list[int], step: int, first_loss: float | None) -> dict[str, float]:
        """One SGD step on the dialogues ``idx`` (the whole batch, in every rank); returns the
        batch's metrics."""
        cfg = self.cfg
        mine = distributed.shard(idx, self.rank, self.world)
        entries = self.entries(mine) if mine else []
        loss, parts, counts = None, {}, (0, 0)  # a rank may get no dialogue of a small batch
        if entries:
            logits, ps = student_logits(
                self.model,
                self.adapter,
                self.compressor,
                entries,
                pad_token_id=self.pad_id,
                device=self.device,
            )
            counts = (logits.shape[0], len(ps))
        w_kl, w_reg = self._shares(counts)
        if entries:
            target = _batch_target(entries, self.device)
            # lambdas rescaled so that w_kl * loss = w_kl * KL + w_reg * (regularisers)
            reg = w_reg / w_kl
            loss, parts = total_loss(
                target,
                logits.float(),
                ps,
                lambda_ent=cfg.lambda_ent * reg,
                lambda_col=cfg.lambda_col * reg,
            )
            loss = loss * w_kl
        if self.world > 1:
            parts = self._batch_parts(parts, counts)
        _check_loss(parts["loss"], first_loss, step, cfg)
        self.opt.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        if self.world > 1:  # every replica then clips and steps on the whole batch's gradient
            distributed.sum_grads(self.params)
        grad_norm = _clip(self.params, cfg)
        if not math.isfinite(grad_norm):
            raise RuntimeError(
                f"gradient norm became {grad_norm} at step {step + 1} (loss {parts['loss']:.4g}):"
                f" lower train.lr (now {cfg.lr}) and keep gradient clipping on (grad_clip, now "
                f"{cfg.grad_clip})"
            )
        self.opt.step()
        return {**parts, "grad_norm": grad_norm}

    def _shares(self, counts: tuple[int, int]) -> tuple[float, float]:
        """This rank's weights of its mean KL and mean regularisers in the batch loss.

        The KL is a mean over the batch's answer tokens and the regularisers over its images, so
        a rank holding T_r of T tokens and I_r of I images contributes T_r / T of its KL and
        I_r / I of its regularisers: the ranks' gradients then sum to the one-process gradient.
        Both are 1 in one process (the loss is then bit-identical to an unsplit step).
        """
        if self.world == 1:
            return 1.0, 1.0
        tokens, images = distributed.all_sum(counts, self.device)
        return counts[0] / tokens, counts[1] / images

    def _batch_parts(self, parts: dict[str, float], counts: tuple[int, int]) -> dict[str, float]:
        """The whole batch's kl / entropy / collapse / loss from every rank's own means."""
        cfg = self.cfg
        t, i = counts
        sums = [parts.get("kl", 0.0) * t, parts.get("entropy", 0.0) * i]
        sums += [parts.get("collapse", 0.0) * i, t, i]
        kl, ent, col, tokens, images = distributed.all_sum(sums, self.device)
        out = {"kl": kl / tokens, "entropy": ent / images, "collapse": col / images}
        out["loss"] = out["kl"] + cfg.lambda_ent * out["entropy"] + cfg.lambda_col * out["collapse"]
        return out


def _check_cache(
    cache: TargetCache | None, n: int, needs: frozenset[str], method: str, topk: int | None
) -> None:
    if cache is None:
        return
    if len(cache) != n:
        raise ValueError(f"target cache has {len(cache)} dialogues, dataset has {n}")
    if cache.topk != topk:
        # Another k is another objective (and a full cache would silently cost V / k the memory).
        raise ValueError(
            f"target cache holds top-{cache.topk} targets (None: full vocabulary) but "
            f"train.target_topk={topk!r}; rebuild it with build_target_cache(..., topk={topk!r})"
        )
    missing = set(needs) - set(cache.needs)
    if missing:
        raise ValueError(f"target cache lacks context fields {sorted(missing)} that {method} needs")


def _check_loss(value: float, first: float | None, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(value):
        raise RuntimeError(
            f"loss became {value} at step {step + 1}: lower train.lr (now {cfg.lr}) and keep "
            f"gradient clipping on (grad_clip, now {cfg.grad_clip}); the collapse term diverges "
            "without clipping"
        )
    if first is not None and value > cfg.explode_factor * max(first, 1e-6):
        raise RuntimeError(
            f"loss exploded at step {step + 1}: {value:.4g} > {cfg.explode_factor} x the first "
            f"loss {first:.4g}; lower train.lr (now {cfg.lr}) or tighten grad_clip (now "
            f"{cfg.grad_clip})"
        )


def _clip(params: list[Tensor], cfg: TrainConfig) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )
    if cfg.grad_clip is not None and math.isfinite(norm):
        if cfg.clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    return norm
