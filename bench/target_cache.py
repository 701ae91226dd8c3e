"""How much a top-k teacher cache costs in accuracy and saves in bytes.

Usage::

    python -m bench.target_cache --teachers models/base/tiny-llava models/base/tiny-qwen2-vl \
        --random tiny-llava tiny-qwen2-vl

Training distils against the frozen model's answer-token distributions, cached once per data
set. At a real vocabulary (LLaVA-1.5: 32,064; Qwen2-VL: 152,064) the full float32 rows do not
fit on disk for ~20k dialogues, so the cache keeps the top-k log-probs (float16), their ids
(int32) and the log tail mass (float32), and training uses the bucketed KL
(``mc_core.training.losses.topk_kl``), a lower bound of the full KL.

Two measurements:

- error: for every teacher (trained tiny ones and random-weight builds of the same
  architectures) and every compressor (``sample`` / ``pool`` at rates 0.5 and 0.9, and a
  ``metacompress`` trained for a few steps), the full KL over the answer tokens of
  ``--dialogues`` dialogues next to the bucketed KL from the float16 top-k cache, for every k;
  also the teacher's mean tail mass at each k (the error is ``p_tail`` times the KL within the
  tail, so it is what bounds the error);
- size: bytes of the targets per 1,000 dialogues, analytic at the real vocabularies, and the
  bytes the saved tiny caches actually hold per answer token (safetensors header included).

Writes ``--out`` (JSON) and the same path with ``.md`` (the tables of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from mc_core import io
from mc_core.compressors import build
from mc_core.data.schema import load
from mc_core.models import zoo
from mc_core.models.families import adapter_for
from mc_core.runtime import token_dim
from mc_core.training.loop import TrainConfig, student_logits, train
from mc_core.training.losses import TopKTarget, answer_kl, topk_kl
from mc_core.training.targets import build_target_cache, save_target_cache

KS = (8, 16, 32, 64, 128, None)  # None: the whole vocabulary
VOCABS = {"llava-1.5 (32,064)": 32_064, "qwen2-vl (152,064)": 152_064}
# GQA-like dialogues: 3 turns of ~1.5 answer tokens, plus the end-of-turn token of each answer.
TURNS, ANSWER_TOKENS = 3, 1.5
TOKENS_PER_DIALOGUE = TURNS * (ANSWER_TOKENS + 1)
# The briefly trained metacompress: params.yaml's recipe (lr, momentum, clip, lambdas).
RECIPE = dict(
    lr=0.02,
    momentum=0.9,
    grad_clip=1.0,
    lambda_ent=0.01,
    lambda_col=0.01,
    batch_size=16,
    compressor_kwargs={"d_c": 64},
    device="cpu",
    progress=False,
    log_every=1_000,
)


def bytes_per_token(vocab: int, k: int | None) -> int:
    """Target bytes per answer token: float32 rows, or k float16 values + k int32 ids + tail
    (k capped at the vocabulary, where it stores more than the full row: only tiny vocabularies)."""
    if k is None:
        return 4 * vocab
    return min(k, vocab) * (2 + 4) + 4


def size_table() -> list[dict]:
    """Analytic bytes per 1,000 dialogues at the real vocabularies."""
    rows = []
    for name, vocab in VOCABS.items():
        for k in KS:
            per_token = bytes_per_token(vocab, k)
            rows.append(
                {
                    "vocab": name,
                    "k": k,
                    "bytes_per_token": per_token,
                    "bytes_per_1000_dialogues": per_token * TOKENS_PER_DIALOGUE * 1000,
                    "ratio_to_full": per_token / (4 * vocab),
                }
            )
    return rows


def measured_sizes(model, processor, data, full) -> list[dict]:
    """Bytes the saved caches' target tensors take per answer token, read from the files."""
    from safetensors import safe_open

    tokens = sum(len(e.positions) for e in full.entries)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in KS:
            cache = (
                full
                if k is None
                else build_target_cache(model, processor, data, progress=False, topk=k)
            )
            path = Path(tmp) / f"k{k}"
            save_target_cache(cache, path)
            with safe_open(str(path / "cache.safetensors"), "pt") as f:
                nbytes = sum(
                    math.prod(f.get_slice(n).get_shape()) * _itemsize(f.get_slice(n).get_dtype())
                    for n in f.keys()  # noqa: SIM118 (safe_open is not a mapping)
                    if ".target" in n
                )
            rows.append(
                {
                    "k": k,
                    "target_bytes_per_token": nbytes / tokens,
                    "analytic_bytes_per_token": bytes_per_token(_vocab(model), k),
                }
            )
    return rows


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "I32": 4, "I64": 8, "BF16": 2}[dtype]


def _vocab(model) -> int:
    cfg = getattr(model.config, "text_config", model.config)
    return int(cfg.vocab_size)


@torch.no_grad()
def _student(model, processor, compressor, cache, batch: int = 16) -> torch.Tensor:
    adapter, out = adapter_for(model), []
    pad = processor.tokenizer.pad_token_id
    for start in range(0, len(cache), batch):
        logits, _ = student_logits(
            model,
            adapter,
            compressor.eval(),
            cache.entries[start : start + batch],
            pad_token_id=int(pad if pad is not None else 0),
            device=torch.device("cpu"),
        )
        out.append(logits.float())
    return torch.cat(out)


def errors(target: torch.Tensor, student: torch.Tensor) -> list[dict]:
    """Full KL and bucketed KL (float16 and float32 values) at every k, with the tail mass."""
    full = float(answer_kl(target, student))
    rows = []
    for k in KS:
        kk = target.shape[-1] if k is None else k
        kl16 = float(topk_kl(TopKTarget.from_logprobs(target, kk), student))
        t32 = TopKTarget.from_logprobs(target, kk, dtype=torch.float32)
        kl32 = float(topk_kl(t32, student))
        rows.append(
            {
                "k": k,
                "kl_full": full,
                "kl_topk": kl16,
                "abs_err": abs(kl16 - full),
                "rel_err": abs(kl16 - full) / max(full, 1e-30),
                "abs_err_fp32_values": abs(kl32 - full),
                "tail_mass_mean": float(t32.tail.exp().mean()),
                "tail_mass_max": float(t32.tail.exp().max()),
            }
        )
    return rows


def compressors(model, processor, train_data, steps: int) -> dict[str, object]:
    """The compared compressors; metacompress trained `steps` steps on `train_data`."""
    dim = token_dim(model)
    out = {f"{m}@{r}": build(m, rate=r, dim=dim) for m in ("sample", "pool") for r in (0.5, 0.9)}
    cache = build_target_cache(model, processor, train_data, progress=False, topk=None)
    cfg = TrainConfig(**RECIPE, max_steps=steps, target_topk=None)
    out["metacompress@0.9"] = train(cfg, model, processor, train_data, rate=0.9, cache=cache)
    return out


def measure_model(label: str, model, processor, test, train_data, steps: int) -> dict:
    t0 = time.perf_counter()
    full = build_target_cache(model, processor, test, progress=False, topk=None)
    target = torch.cat([e.target for e in full.entries])
    result = {
        "model": label,
        "vocab": _vocab(model),
        "answer_tokens": int(target.shape[0]),
        "errors": {},
    }
    for name, comp in compressors(model, processor, train_data, steps).items():
        result["errors"][name] = errors(target, _student(model, processor, comp, full))
    result["sizes"] = measured_sizes(model, processor, test, full)
    result["seconds"] = time.perf_counter() - t0
    print(f"{label}: {result['seconds']:.0f} s", flush=True)
    return result


def _human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _k(k: int | None) -> str:
    return "full" if k is None else str(k)


def markdown(result: dict) -> str:
    ks = [_k(k) for k in KS]
    lines = [
        "| teacher (V) | compressor | KL full | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|---|" + "---|" * len(ks),
    ]
    for m in result["models"]:
        for name, rows in m["errors"].items():
            cells = [f"{r['abs_err']:.1e} ({100 * r['rel_err']:.2g}%)" for r in rows]
            lines.append(
                f"| {m['model']} ({m['vocab']}) | {name} | {rows[0]['kl_full']:.3g} | "
                + " | ".join(cells)
                + " |"
            )
    lines += [
        "",
        "| teacher | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for m in result["models"]:
        rows = next(iter(m["errors"].values()))
        lines.append(
            f"| {m['model']} | " + " | ".join(f"{r['tail_mass_mean']:.1e}" for r in rows) + " |"
        )
    lines += [
        "",
        "| vocabulary | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for name in VOCABS:
        rows = [r for r in result["size_table"] if r["vocab"] == name]
        lines.append(
            f"| {name} | " + " | ".join(_human(r["bytes_per_1000_dialogues"]) for r in rows) + " |"
        )
    m = result["models"][0]
    lines += [
        "",
        f"| {m['model']} cache (V={m['vocab']}) | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        "| target bytes / answer token (analytic) | "
        + " | ".join(
            f"{r['target_bytes_per_token']:.0f} ({r['analytic_bytes_per_token']})"
            for r in m["sizes"]
        )
        + " |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--teachers", nargs="*", default=[], help="saved base models (mc_core.models.zoo)"
    )
    ap.add_argument("--random", nargs="*", default=[], help="tiny archs with random weights")
    ap.add_argument("--data", default="data/test")
    ap.add_argument("--train-data", default="data/train")
    ap.add_argument("--dialogues", type=int, default=48)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--out", default="bench/results/target_cache.json")
    args = ap.parse_args(argv)
    if not args.teachers and not args.random:
        ap.error("give --teachers and/or --random")
    torch.set_num_threads(1)  # shared CPU; the numbers are errors and bytes, not timings
    torch.manual_seed(0)
    test = load(args.data).select(range(args.dialogues))
    train_data = load(args.train_data).select(range(args.dialogues))
    models = []
    for path in args.teachers:
        model, processor = zoo.load(path)
        label = f"{zoo.info(path).get('arch') or Path(path).name} trained"
        models.append(measure_model(label, model, processor, test, train_data, args.train_steps))
    for arch in args.random:
        model, processor = zoo.build(arch)
        label = f"{arch} random"
        models.append(measure_model(label, model, processor, test, train_data, args.train_steps))
    result = {
        "dialogues": args.dialogues,
        "data": args.data,
        "train_steps": args.train_steps,
        "tokens_per_dialogue_assumed": TOKENS_PER_DIALOGUE,
        "models": models,
        "size_table": size_table(),
    }
    io.write_json(args.out, result)
    md = markdown(result)
    io.write_text(Path(args.out).with_suffix(".md"), md)
    print(md)
    return result


if __name__ == "__main__":
    main()
