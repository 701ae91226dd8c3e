"""`metacompress plan`: the cost plan of training compressors (``mc_core.training.plan``).

Two ways, one table:

- explicit arguments (``--model NAME ... --rates R ...`` and the recipe), planned by the
  library here: no params file, no pipeline;
- ``--params FILE``: the pipeline's own plan of that params file, ``python -m tasks.plan``, run
  as a subprocess (the front-end never imports the pipeline: .importlinter), with ``--gpu``,
  ``--gpus``, ``--utilization``, ``--backward-factor`` and ``--json`` passed on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from mc_cli.resolve import UsageError

__all__ = ["add_parser", "plan"]


def _micro(text: str) -> int | str | None:
    if text in ("auto", "none", "null"):
        return None if text != "auto" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, none or an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected >= 1")
    return value


def add_parser(sub, positive, rate) -> None:
    """The `plan` subcommand (``positive``, ``rate``: the CLI's argument types)."""
    p = sub.add_parser(
        "plan",
        help="micro-batch, peak memory, disk and GPU-hours of training compressors",
        description="Plan training before renting GPUs: per (model, rate) the micro-batch "
        "that fits the GPU, its peak memory, FLOPs per step and GPU-hours; per model the "
        "disk of the target store. Assumptions are printed with the plan (docs/pipeline.md, "
        "'Memory and cost plan'). With --params FILE it runs `python -m tasks.plan` on that "
        "params file instead of the explicit recipe.",
    )
    p.add_argument("--params", default=None, help="plan this params file (python -m tasks.plan)")
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        metavar="NAME",
        help="built-in real (llava-1.5-7b, qwen2-vl-7b, ...) or tiny names, or under models/base",
    )
    p.add_argument("--rates", nargs="+", type=rate, default=[0.5, 0.75, 0.9], metavar="R")
    p.add_argument("--dialogues", type=positive, default=20000, help="training dialogues")
    p.add_argument("--epochs", type=positive, default=2)
    p.add_argument("--batch-size", type=positive, default=36, help="dialogues per step")
    p.add_argument("--micro-batch", type=_micro, default="auto", help="auto, none or an int")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--visual-tokens", choices=("store", "recompute"), default="store")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--targets", choices=("gold", "teacher"), default="teacher")
    p.add_argument("--max-memory-gib", type=float, default=None, help="budget per GPU (GiB)")
    p.add_argument("--data", default=None, help="prepared dialogues to measure shapes on")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, a6000, l40s, rtx4090")
    p.add_argument("--gpus", type=positive, default=1, help="data-parallel GPUs")
    p.add_argument("--utilization", type=float, default=0.35, help="assumed MFU (0.35)")
    p.add_argument("--backward-factor", type=float, default=2.0, help="backward / forward")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _via_tasks(args) -> int:
    """``python -m tasks.plan`` on the params file, in this interpreter."""
    cmd = [sys.executable, "-m", "tasks.plan", "--params", args.params, "--gpu", args.gpu]
    cmd += ["--gpus", str(args.gpus), "--utilization", str(args.utilization)]
    cmd += ["--backward-factor", str(args.backward_factor)]
    cmd += ["--json"] if args.json else []
    return subprocess.run(cmd, check=False).returncode


def plan(args) -> int:
    if args.params is not None:
        if args.model:
            raise UsageError("--params FILE plans that file's grid: leave out --model")
        return _via_tasks(args)
    if not args.model:
        raise UsageError("name --model NAME ... (or --params FILE)")
    from mc_core.training import plan as mplan
    from mc_core.training.config import TrainConfig
    from mc_core.training.plan_inputs import arch_input

    try:
        setup = mplan.Setup(
            mplan.get_gpu(args.gpu, where="--gpu"),
            gpus=args.gpus,
            utilization=args.utilization,
            backward_factor=args.backward_factor,
        )
        cfg = TrainConfig(
            compressor_kwargs={"d_c": 64},
            epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch=args.micro_batch,
            activation_checkpointing=args.activation_checkpointing,
            visual_tokens=args.visual_tokens,
            dtype=args.dtype,
            targets=args.targets,
            max_memory_gib=args.max_memory_gib,
        )
        inputs = [arch_input(name, data_dir=args.data) for name in args.model]
        result = mplan.plan_grid(
            inputs, list(args.rates), lambda a, r: cfg, dialogues=args.dialogues, setup=setup
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(json.dumps(result, indent=2) if args.json else mplan.format_plan(result))
    return 0
