"""`metacompress`: chat with, compress for, evaluate and list compressed LVLMs.

    metacompress chat IMAGE --model M --compressor C [--rate R] [-q QUESTION ...]
    metacompress compress IMAGE --model M --compressor C [--rate R] -o OUT.safetensors
    metacompress evaluate --model M --data DIR --methods NAME|CKPT|URI ... --rate R
    metacompress list
    metacompress plan --model NAME ... [--rates R ...] [--gpu G --gpus N] | --params FILE

C is a method name (`metacompress list` and `--help` show them; needs --rate), a checkpoint
folder (`models/compressors/<cell>`) or a registry URI (`models:/<name>@champion`, MLflow at
`MLFLOW_TRACKING_URI`, default the checkout's `mlflow.db`). A bad argument prints one line and
exits with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mc_cli import plan as plan_command
from mc_cli.commands import COMMANDS
from mc_cli.resolve import UsageError
from mc_core.progress import quiet_library_bars

__all__ = ["build_parser", "main"]

_COMPRESSOR_HELP = (
    "a method name such as none, sample or visionzip (`metacompress list` shows them all; "
    "needs --rate), a checkpoint folder, or a registry URI models:/<name>@champion"
)


def _rate(text: str) -> float:
    """``--rate``: a number in (0, 1), by the library's own check."""
    from mc_core.compressors.ops import check_rate

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_rate(value, where="rate")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _common(p: argparse.ArgumentParser, *, compressor: bool = True) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="saved model folder, or a name under models/base (e.g. tiny-llava)",
    )
    if compressor:
        p.add_argument("--compressor", default="none", help=_COMPRESSOR_HELP)
    p.add_argument(
        "--rate",
        type=_rate,
        default=None,
        help="reduction rate in (0, 1): m = ceil((1 - rate) n) tokens kept (a checkpoint's "
        "own rate by default; an any-rate checkpoint takes any rate in its trained span)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    ap = argparse.ArgumentParser(
        prog="metacompress",
        description="Prompt-agnostic visual-token compression for LVLMs: chat, export "
        "compressed image embeddings, evaluate, list the registry, plan training costs.",
        epilog="Run `metacompress COMMAND --help` for a command's options.",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "chat",
        help="multi-turn chat about an image",
        description="Multi-turn chat about IMAGE. Each turn prints the visual "
        "tokens kept, the prefill time and the answer. Questions come from -q "
        "(repeatable), else from stdin lines when it is not a terminal, else "
        "from an interactive prompt (empty line or Ctrl-D ends).",
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    _common(p)
    p.add_argument("-q", "--question", action="append", default=[], help="a question (repeat)")
    p.add_argument("--max-new-tokens", type=_positive, default=16, help="answer length limit")

    p = sub.add_parser(
        "compress",
        help="write an image's compressed embeddings for an engine",
        description="Compress IMAGE's visual tokens and write them (LLM input "
        "space) to a .safetensors file with what an engine needs beside them "
        "(Qwen family: image_grid_thw consistent with m). See docs/serving.md.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    _common(p)
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")

    p = sub.add_parser(
        "evaluate",
        help="per-turn accuracy of methods on a dataset",
        description="Run multi-turn dialogues of a dataset folder with each "
        "method at one rate and print per-turn accuracy.",
    )
    _common(p, compressor=False)
    p.add_argument("--data", required=True, help="dataset folder (e.g. data/test)")
    p.add_argument(
        "--methods", nargs="+", required=True, metavar="METHOD", help="each " + _COMPRESSOR_HELP
    )
    p.add_argument(
        "--history",
        choices=("model", "gold"),
        default="model",
        help="later turns see the model's own answers or the gold ones",
    )
    p.add_argument("--max-dialogues", type=_positive, default=None)
    p.add_argument("--batch-size", type=_positive, default=16, help="dialogues per batch")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")

    sub.add_parser(
        "list",
        help="registered compressors, their champion and metrics",
        description="Registered compressors in the MLflow registry "
        "(MLFLOW_TRACKING_URI, default sqlite:///mlflow.db in the working folder): "
        "champion version, its score and its run's metrics.",
    )
    plan_command.add_parser(sub, _positive, _rate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `metacompress` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_library_bars()  # off a terminal, no "Loading weights" frames in captured output
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"metacompress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
