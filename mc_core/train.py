"""Training the MetaCompress generator against the frozen LVLM (paper-spec.md recipe).

Loss per batch of gold 3-turn dialogues (teacher forcing, one pass per dialogue):

    KL(p_full || p_comp) over every answer token of every turn
      + lambda_ent * mean row entropy of P + lambda_col * max column sum of P

The teacher is the same frozen LVLM with all visual tokens. Teacher and student answer
positions are aligned from the end of each sequence (they differ by n - m visual tokens).

Everything the frozen model contributes is fixed while it is frozen, so it is computed once per
dialogue and kept in a `TeacherCache`: the projector output `X` per image, its token contexts
(positions / grid), the text-side inputs, and the teacher's answer-position log-probs
(`logits_to_keep` selects only those rows of the LM head). Each step then runs only the
generator and the student forward. The cache does not depend on the rate: build it once
(`build_teacher_cache`) and pass it to `train` for every rate of an architecture.

Training state (generator weights, optimizer, step, RNG) is checkpointed atomically every
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
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mc_core.adapters import for_model
from mc_core.compressors import Compressor, TokenContext, build
from mc_core.conversation import reset_state, token_dim
from mc_core.dialogue import collate, encode_dialogue, to_device
from mc_core.losses import answer_kl, collapse, row_entropy

__all__ = [
    "CacheEntry",
    "TeacherCache",
    "TrainConfig",
    "build_teacher_cache",
    "load_teacher_cache",
    "prepare_model",
    "resolve_device",
    "save_teacher_cache",
    "student_logits",
    "train",
]

Callback = Callable[[int, dict[str, float]], None]
_STATE_JSON = "train_state.json"


@dataclass
class TrainConfig:
    """Every knob of a training run (defaults: the paper's recipe).

    Measured on the trained tiny-llava teacher (rate 0.9, 300 training / 60 held-out synthetic
    dialogues): with the paper's lr 1e-3 and norm clip 1e-2 a few hundred steps leave the
    generator at its init (KL unchanged, acc_avg 0.29, below sample 0.32 / pool 0.34); with
    lambda_ent = lambda_col = 1 the regularisers dominate a KL of ~2 nats and drive P one-hot.
    lr 0.02, momentum 0.9, grad_clip 1.0, lambdas 0.01, 10 epochs gave acc_avg 0.45 and
    held-out KL 1.22 (pool 1.58). Tune these per world; the defaults stay the paper's.

    Attributes:
        method: the trainable compressor to train (registry name).
        lr: SGD learning rate.
        momentum: SGD momentum (the paper says plain SGD: 0).
        grad_clip: gradient clipping threshold (None: no clipping; the paper clips at 1e-2, and
            the collapse term diverges without it).
        clip_mode: "norm" (total gradient norm) or "value" (each element).
        epochs: passes over the dataset.
        batch_size: dialogues per step.
        lambda_ent, lambda_col: weights of the row-entropy and collapse terms.
        d_c: generator projection width.
        checkpoint_every: steps between training-state checkpoints (the last step always
            saves).
        seed: generator init and batch order.
        device: "auto" (cuda with a bf16 model when available, else cpu), "cpu" or "cuda".
        max_steps: stop after this many steps in total (caps `epochs`).
        log_every: steps between callback calls (the last step is always reported).
        explode_factor: the run stops when the loss exceeds this multiple of the first loss.
        cache_teacher: reuse the teacher cache across steps (False recomputes the frozen
            model's outputs every step; kept for the throughput benchmark).
        teacher_batch: dialogues per teacher forward when building the cache.
        progress: show a tqdm bar.
    """

    method: str = "metacompress"
    lr: float = 1e-3
    momentum: float = 0.0
    grad_clip: float | None = 1e-2
    clip_mode: str = "norm"
    epochs: int = 2
    batch_size: int = 36
    lambda_ent: float = 1.0
    lambda_col: float = 1.0
    d_c: int = 64
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None
    log_every: int = 10
    explode_factor: float = 100.0
    cache_teacher: bool = True
    teacher_batch: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("lr", "explode_factor"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v <= 0
            ):
                raise bad(name, "expected a finite number > 0")
        for name in ("lambda_ent", "lambda_col"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v < 0
            ):
                raise bad(name, "expected a finite number >= 0")
        if not (0 <= self.momentum < 1):
            raise bad("momentum", "expected 0 <= momentum < 1")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise bad("grad_clip", "expected None or a finite number > 0")
        if self.clip_mode not in ("norm", "value"):
            raise bad("clip_mode", "expected 'norm' or 'value'")
        for name in (
            "epochs",
            "batch_size",
            "d_c",
            "checkpoint_every",
            "log_every",
            "teacher_batch",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "expected a positive int")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or self.max_steps < 1
        ):
            raise bad("max_steps", "expected None or a positive int")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise bad("device", "expected 'auto', 'cpu' or 'cuda[:i]'")

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        skip = {
            "max_steps",
            "epochs",
            "progress",
            "device",
            "log_every",
            "checkpoint_every",
            "teacher_batch",
            "cache_teacher",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ---------------------------------------------------------------------------------------------
# Device and model preparation


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA raises ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return dev


def prepare_model(model, device: torch.device):
    """Freeze the LVLM (eval, no gradients) and move it; on CUDA use bf16 and SDPA attention."""
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        model.to(device=device, dtype=torch.bfloat16)
        # Classes without the setter keep what their config chose.
        with contextlib.suppress(AttributeError, ValueError):
            model.set_attn_implementation("sdpa")
    else:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------
# The teacher cache


@dataclass
class CacheEntry:
    """What the frozen model gives for one dialogue (all on CPU).

    Attributes:
        base: the processor's inputs for the full gold dialogue (batch of one, n placeholders
            per image); pixel tensors are zero-memory stubs of their shape.
        tokens: projector output per image, `[n_i, d]`.
        contexts: `TokenContext` per image.
        positions: teacher logit positions of the answer tokens, `[T]`.
        teacher: the teacher's log-probs at those positions, `[T, V]` (float32).
        length: teacher sequence length.
    """

    base: dict[str, Any]
    tokens: list[Tensor]
    contexts: list[TokenContext]
    positions: Tensor
    teacher: Tensor
    length: int


@dataclass
class TeacherCache:
    """Per-dialogue frozen-model outputs, in dataset order; independent of the rate."""

    entries: list[CacheEntry] = field(default_factory=list)
    needs: frozenset[str] = frozenset()
    build_s: float = 0.0

    def __len__(self) -> int:
        return len(self.entries)


def _row_images(row: dict[str, Any], where: str) -> list[Any]:
    image = row.get("image")
    if image is None:
        raise ValueError(f"{where}: no 'image' in the row")
    return list(image) if isinstance(image, list | tuple) else [image]


def _rgb(img):
    return img.convert("RGB") if hasattr(img, "convert") and img.mode != "RGB" else img


def _encode_rows(processor, adapter, rows: Sequence[dict[str, Any]], where: str):
    out = []
    for row in rows:
        images = [_rgb(im) for im in _row_images(row, where)]
        inputs, positions = encode_dialogue(processor, images, row["questions"], row["answers"])
        out.append((inputs, positions))
    return out


def _pad_id(processor) -> int:
    pad = processor.tokenizer.pad_token_id
    return int(pad if pad is not None else processor.tokenizer.eos_token_id)


@torch.no_grad()
def _teacher_entries(model, processor, adapter, rows, needs, device, where) -> list[CacheEntry]:
    """Encode rows, run the vision tower once, the teacher once (batched), return entries."""
    encoded = _encode_rows(processor, adapter, rows, where)
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
                teacher=torch.empty(0),
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
        e.teacher = part.clone()
    return entries


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
    return [dataset[int(i)] for i in indices]


def build_teacher_cache(
    model,
    processor,
    dataset,
    *,
    needs: frozenset[str] = frozenset(),
    adapter=None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> TeacherCache:
    """Run the frozen model once over every dialogue of `dataset`.

    Args:
        model: the LVLM (frozen by this call; moved to `device`).
        processor: its processor.
        dataset: rows of the dialogue schema (`image`, `questions`, `answers`, ...).
        needs: extra token-context fields the compressor needs (`Compressor.needs`).
        adapter: the family adapter (default `for_model(model)`).
        batch_size: dialogues per teacher forward.
        device: see `TrainConfig.device`.
        progress: tqdm bar.

    Returns:
        The cache, in dataset order.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prepare_model(model, dev)
    adapter = adapter if adapter is not None else for_model(model)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to train on")
    t0 = time.perf_counter()
    cache = TeacherCache(needs=frozenset(needs))
    bar = tqdm(total=n, desc="teacher cache", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        cache.entries += _teacher_entries(
            model,
            processor,
            adapter,
            _rows(dataset, idx),
            cache.needs,
            dev,
            f"dataset rows {start}+",
        )
        bar.update(len(idx))
    bar.close()
    cache.build_s = time.perf_counter() - t0
    return cache


def save_teacher_cache(cache: TeacherCache, path: str | os.PathLike) -> None:
    """Write the cache as safetensors + JSON into the directory `path` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
        tensors[f"{i}.teacher"] = e.teacher.contiguous()
        meta.append(m)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    save_file(tensors, str(tmp / "cache.safetensors"))
    (tmp / "cache.json").write_text(json.dumps({"needs": sorted(cache.needs), "entries": meta}))
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, path)


def load_teacher_cache(path: str | os.PathLike) -> TeacherCache:
    """Read a cache written by `save_teacher_cache` (no unpickling)."""
    path = Path(path)
    if not (path / "cache.json").is_file():
        raise ValueError(f"{path}: no cache.json (not a teacher cache)")
    info = json.loads((path / "cache.json").read_text())
    tensors = load_file(str(path / "cache.safetensors"))
    cache = TeacherCache(needs=frozenset(info["needs"]))
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
                teacher=tensors[f"{i}.teacher"],
                length=m["length"],
            )
        )
    return cache


# ---------------------------------------------------------------------------------------------
# The student


def student_logits(
    model, adapter, compressor, entries: Sequence[CacheEntry], *, pad_token_id: int, device
) -> tuple[Tensor, list[Tensor]]:
    """Compressed forward over cached dialogues: answer logits `[sum T, V]` and every P.

    The student's answer positions are the teacher's shifted by the visual tokens removed
    before them (sequences aligned from the end).
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
        shift = e.length - int(r["input_ids"].shape[1])
        mask[i, e.positions - shift] = True
    logits = model(**batch, logits_to_keep=mask.to(device)).logits  # (sum T, V)
    return logits, ps


# ---------------------------------------------------------------------------------------------
# Checkpointing


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
    fd, tmp = tempfile.mkstemp(prefix=name + ".tmp-", dir=out_dir)
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, out_dir / name)
    # The JSON is the commit point: it names the tensor file of the last complete checkpoint.
    _atomic_write_text(
        out_dir / _STATE_JSON, json.dumps({**info, "step": step, "file": name}, indent=1)
    )
    for old in out_dir.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_state(out_dir: Path, compressor, opt, expect: dict[str, Any]) -> tuple[int, dict]:
    info = json.loads((out_dir / _STATE_JSON).read_text())
    for key, value in expect.items():
        if info.get(key) != value:
            raise ValueError(
                f"{out_dir / _STATE_JSON}: checkpoint has {key}={info.get(key)!r}, this run "
                f"{value!r}; resume with the same settings or use another out_dir"
            )
    tensors = load_file(str(out_dir / info["file"]))
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
    cache: TeacherCache | None = None,
    adapter=None,
) -> Compressor:
    """Train a compressor for `rate` on `dataset` against the frozen `model`.

    Args:
        cfg: the run's settings.
        model: the LVLM; frozen (`eval`, `requires_grad_(False)`) and moved to the device.
        processor: its processor.
        dataset: dialogue rows (schema of `mc_core.data.schema`).
        rate: reduction rate in (0, 1).
        out_dir: where training state is checkpointed; an existing checkpoint there is resumed.
            None: no checkpoints.
        callbacks: called as `cb(step, metrics)` every `cfg.log_every` steps and at the end;
            `metrics` holds loss, kl, entropy, collapse, grad_norm, epoch, samples_per_s.
        cache: a `TeacherCache` of this model on `dataset` (built here when None and
            `cfg.cache_teacher`).
        adapter: the family adapter (default `for_model(model)`).

    Returns:
        The trained compressor (float32, eval mode, on the training device).

    Raises:
        ValueError: bad rate, empty dataset, cache of another size, or a checkpoint in
            `out_dir` written with other settings.
        RuntimeError: the loss or gradient became NaN/inf, or the loss exploded.
    """
    device = resolve_device(cfg.device)
    prepare_model(model, device)
    adapter = adapter if adapter is not None else for_model(model)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to train on")
    dim = token_dim(model)
    torch.manual_seed(cfg.seed)
    compressor = build(cfg.method, rate=rate, dim=dim, d_c=cfg.d_c, seed=cfg.seed)
    if not compressor.trainable:
        raise ValueError(f"TrainConfig.method={cfg.method!r} has no trainable parameters")
    compressor = compressor.float().to(device).train()
    params = [p for p in compressor.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    pad_id = _pad_id(processor)

    if cache is None and cfg.cache_teacher:
        cache = build_teacher_cache(
            model,
            processor,
            dataset,
            needs=compressor.needs,
            adapter=adapter,
            batch_size=cfg.teacher_batch,
            device=device,
            progress=cfg.progress,
        )
    if cache is not None and len(cache) != n:
        raise ValueError(f"teacher cache has {len(cache)} dialogues, dataset has {n}")
    missing = set(compressor.needs) - set(cache.needs) if cache is not None else set()
    if missing:
        raise ValueError(
            f"teacher cache lacks context fields {sorted(missing)} that {cfg.method} needs"
        )

    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    info = {"config": cfg.fingerprint(), "rate": float(rate), "dataset_size": n}
    step, first_loss = 0, None
    state_dir = Path(out_dir) if out_dir is not None else None
    if state_dir is not None and (state_dir / _STATE_JSON).is_file():
        step, saved = _load_state(state_dir, compressor, opt, info)
        first_loss = saved.get("first_loss")
    callbacks = list(callbacks or [])
    bar = tqdm(total=total, initial=step, desc=f"train r={rate}", disable=not cfg.progress)
    t_start, samples = time.perf_counter(), 0
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        idx = _order(n, cfg.seed, epoch)[k * cfg.batch_size : (k + 1) * cfg.batch_size].tolist()
        if cache is not None:
            entries = [cache.entries[i] for i in idx]
        else:
            entries = _teacher_entries(
                model,
                processor,
                adapter,
                _rows(dataset, idx),
                compressor.needs,
                device,
                f"dataset rows {idx[:4]}",
            )
        logits, ps = student_logits(
            model, adapter, compressor, entries, pad_token_id=pad_id, device=device
        )
        teacher = torch.cat([e.teacher for e in entries]).to(device)
        kl = answer_kl(teacher, logits.float())
        ent = row_entropy(ps)
        col = collapse(ps)
        loss = kl + cfg.lambda_ent * ent + cfg.lambda_col * col
        value = float(loss.detach())
        _check_loss(value, first_loss, step, cfg)
        if first_loss is None:
            first_loss = value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip(params, cfg)
        if not math.isfinite(grad_norm):
            raise RuntimeError(
                f"gradient norm became {grad_norm} at step {step + 1} (loss {value:.4g}): lower "
                f"TrainConfig.lr (now {cfg.lr}) and keep gradient clipping on (grad_clip, now "
                f"{cfg.grad_clip})"
            )
        opt.step()
        step += 1
        samples += len(idx)
        bar.update(1)
        metrics = {
            "loss": value,
            "kl": float(kl.detach()),
            "entropy": float(ent.detach()),
            "collapse": float(col.detach()),
            "grad_norm": grad_norm,
            "epoch": float(epoch),
            "samples_per_s": samples / max(time.perf_counter() - t_start, 1e-9),
        }
        bar.set_postfix(loss=f"{value:.4f}", kl=f"{metrics['kl']:.4f}")
        if step % cfg.log_every == 0 or step == total:
            for cb in callbacks:
                cb(step, metrics)
        if state_dir is not None and (step % cfg.checkpoint_every == 0 or step == total):
            _save_state(state_dir, compressor, opt, step, {**info, "first_loss": first_loss})
    bar.close()
    return compressor.eval()


def _check_loss(value: float, first: float | None, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(value):
        raise RuntimeError(
            f"loss became {value} at step {step + 1}: lower TrainConfig.lr (now {cfg.lr}) and keep "
            f"gradient clipping on (grad_clip, now {cfg.grad_clip}); the collapse term diverges "
            "without clipping"
        )
    if first is not None and value > cfg.explode_factor * max(first, 1e-6):
        raise RuntimeError(
            f"loss exploded at step {step + 1}: {value:.4g} > {cfg.explode_factor} x the first "
            f"loss {first:.4g}; lower TrainConfig.lr (now {cfg.lr}) or tighten grad_clip (now "
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
