"""`python -m bench.batching`: dialogues per second of `BatchConversation` at several batch sizes.

A random-weight LVLM at CPU-scaled shapes (`bench.shapes`: the real image geometry, hence the
real visual token count, with a smaller LLM and tower) answers the same 3-turn dialogues in
batches of 1, 4 and 16. Every batch size runs the same dialogues, so the work is identical and
only the batching differs (the answers are checked equal across batch sizes). Rounds are
interleaved over the batch sizes and the fastest round of each is kept: interference on a
shared machine only adds time.

Writes `bench/results/batching-<machine>.json` with dialogues/s per batch size and
`throughput_ratio_b16_vs_b1`.

Example (the committed CPU result):
    python -m bench.batching --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from bench.machine import describe_machine, machine_slug
from bench.shapes import ARCHS, get_arch
from mc_core.compressors import available, build
from mc_core.inference.engine import BatchConversation
from mc_core.io import write_json
from mc_core.models.processors import build_processor
from mc_core.runtime import resolve_device, token_dim

_WORDS = "what colour shape is at row col the of a how many there yes no red green blue 0 1 2 3 ?"
QUESTIONS = (
    "what colour is at row 1 col 2 ?",
    "how many red shape are there ?",
    "is there a blue shape at row 0 col 3 ?",
)


def build_model(arch_name: str, scale: str, device: torch.device, seed: int = 0):
    """A LLaVA-family model at `scale` of `arch_name` with an offline processor for it."""
    arch = get_arch(arch_name)
    if arch.family != "llava":
        raise ValueError(f"--arch={arch_name!r}: only LLaVA-1.5 shapes are supported here")
    vision = arch.vision_fields(scale)
    processor = build_processor(
        "llava", _WORDS.split(), image_size=vision["image_size"], patch_size=vision["patch_size"]
    )
    tok = processor.tokenizer
    text = {**arch.text_fields(scale), "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    cfg = LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(**vision),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval().requires_grad_(False), processor


def images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def run_dialogues(model, processor, comp, imgs, batch: int, new_tokens: int) -> list[list[str]]:
    """Every dialogue's answers, `batch` dialogues at a time."""
    answers: list[list[str]] = []
    for start in range(0, len(imgs), batch):
        chunk = imgs[start : start + batch]
        conv = BatchConversation(model, processor, comp, images=chunk, max_new_tokens=new_tokens)
        turns = [conv.ask([q] * len(chunk)) for q in QUESTIONS]
        answers.extend([t[j] for t in turns] for j in range(len(chunk)))
    return answers


def measure(args: argparse.Namespace) -> dict:
    """Dialogues/s per batch size (fastest of `repeats` interleaved rounds)."""
    dev = resolve_device(args.device, where="--device")
    model, processor = build_model(args.arch, args.scale, dev)
    comp = None
    if args.method != "none":
        comp = build(args.method, rate=args.rate, dim=token_dim(model)).to(dev).eval()
    imgs = images(args.dialogues, get_arch(args.arch).image_size)
    run_dialogues(model, processor, comp, imgs[:1], 1, args.new_tokens)  # warm-up
    best = {b: float("inf") for b in args.batches}
    answers: dict[int, list[list[str]]] = {}
    for _ in range(args.repeats):
        for b in args.batches:
            t0 = time.perf_counter()
            answers[b] = run_dialogues(model, processor, comp, imgs, b, args.new_tokens)
            best[b] = min(best[b], time.perf_counter() - t0)
            print(f"batch {b}: {best[b]:.2f} s for {len(imgs)} dialogues", file=sys.stderr)
    ref = answers[args.batches[0]]
    same = all(answers[b] == ref for b in args.batches)
    rows = {
        str(b): {"seconds": best[b], "dialogues_per_s": len(imgs) / best[b]} for b in args.batches
    }
    out = {
        "arch": args.arch,
        "scale": args.scale,
        "method": args.method,
        "rate": None if comp is None else args.rate,
        "dialogues": len(imgs),
        "turns": len(QUESTIONS),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "answers_equal_across_batch_sizes": same,
        "batches": rows,
        "machine": describe_machine(dev),
    }
    if "1" in rows and "16" in rows:
        out["throughput_ratio_b16_vs_b1"] = (
            rows["16"]["dialogues_per_s"] / rows["1"]["dialogues_per_s"]
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.batching",
        description="Dialogues/s of batched multi-turn inference (BatchConversation) at "
        "several batch sizes, random weights at cpu-scaled (or real) shapes.",
    )
    p.add_argument("--arch", default="llava-1.5-7b", choices=sorted(ARCHS))
    p.add_argument("--scale", default="cpu", choices=("cpu", "real", "tiny"))
    p.add_argument("--device", default="auto")
    p.add_argument("--method", default="sample", help="compressor name, or none")
    p.add_argument("--rate", type=float, default=0.9)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--dialogues", type=int, default=16, help="dialogues per round")
    p.add_argument("--repeats", type=int, default=2, help="rounds (fastest kept)")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens per answer")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--machine", default=None, help="label in the file name")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.method != "none" and args.method not in available():
        p.error(f"--method={args.method!r} is not one of {['none', *available()]}")
    if any(b < 1 for b in args.batches) or args.dialogues < max(args.batches):
        p.error(f"--batches {args.batches} must be >= 1 and <= --dialogues {args.dialogues}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if resolve_device(args.device, where="--device").type == "cpu":
        torch.set_num_threads(args.threads)
    result = measure(args)
    machine = args.machine or machine_slug(resolve_device(args.device, where="--device"))
    path = write_json(Path(args.out) / f"batching-{machine}.json", result, indent=2)
    ratio = result.get("throughput_ratio_b16_vs_b1")
    for b, row in result["batches"].items():
        print(f"batch {b:>2}: {row['dialogues_per_s']:.3f} dialogues/s")
    if ratio is not None:
        print(f"throughput_ratio_b16_vs_b1 = {ratio:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
