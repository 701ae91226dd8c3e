"""The subcommands of `metacompress`; each takes the parsed arguments, returns a status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import mc_registry
from mc_cli.plan import plan
from mc_cli.resolve import (
    UsageError,
    _check_registry,
    check_compressor,
    load_compressor,
    load_dataset,
    load_model,
    open_image,
)

__all__ = ["COMMANDS", "chat", "compress", "evaluate", "list_registry", "plan"]


def _questions(args) -> Iterator[str]:
    """-q questions, else stdin lines (not a terminal), else an interactive prompt."""
    if args.question:
        yield from args.question
        return
    if not sys.stdin.isatty():
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if not line or line in ("exit", "quit"):
            return
        yield line


def chat(args) -> int:
    from mc_core.inference.conversation import Conversation

    image = open_image(args.image)
    check_compressor(args.compressor, args.rate)
    model, processor = load_model(args.model, args.device)
    comp = load_compressor(args.compressor, model, args.rate)
    conv = Conversation(
        model, processor, comp, images=image, max_new_tokens=args.max_new_tokens, rate=args.rate
    )
    name = "none" if comp is None else f"{comp.name}@{args.rate or comp.rate}"
    print(f"model {args.model} | compressor {name} | image {args.image}", flush=True)
    for k, question in enumerate(_questions(args), start=1):
        answer = conv.ask(question)
        kept = sum(conv.visual_tokens)
        total = kept if conv.P is None else sum(int(p.shape[1]) for p in conv.P)
        ms = conv.prefill_s[-1] * 1e3
        print(f"[turn {k}] tokens kept {kept}/{total} | prefill {ms:.1f} ms")
        print(f"Q: {question}")
        print(f"A: {answer}", flush=True)
    if not conv.questions:
        raise UsageError("no question given (-q, stdin lines or the interactive prompt)")
    return 0


def compress(args) -> int:
    from mc_core.inference.embeds import save_embeds
    from mc_core.inference.serving import compress_image

    if not args.output.endswith(".safetensors"):
        raise UsageError(f"-o {args.output!r}: the output must be a .safetensors file")
    image = open_image(args.image)
    check_compressor(args.compressor, args.rate)
    model, processor = load_model(args.model, args.device)
    comp = load_compressor(args.compressor, model, args.rate)
    try:
        emb = compress_image(
            model,
            processor,
            comp,
            image,
            meta={"model": str(args.model), "image": args.image},
            rate=None if comp is None else args.rate,
        )
    except ValueError as err:
        raise UsageError(f"--compressor {args.compressor!r}: {err}") from None
    try:
        path = save_embeds(emb, args.output)
    except OSError as err:
        raise UsageError(f"-o {args.output!r}: {err}") from None
    grid = "" if emb.grid_thw is None else f" | image_grid_thw {list(emb.grid_thw)}"
    print(f"wrote {path}: {emb.m}/{emb.n} tokens x {emb.embeds.shape[1]} ({emb.family}){grid}")
    return 0


def evaluate(args) -> int:
    from mc_core.evaluation.runner import evaluate as run_evaluate

    if args.rate is None:
        raise UsageError("--rate is required: the reduction rate every method runs at")
    for spec in args.methods:
        check_compressor(spec, args.rate)
    dataset = load_dataset(args.data)
    model, processor = load_model(args.model, args.device)
    compressors = {}
    for spec in args.methods:
        comp = load_compressor(spec, model, args.rate)
        if comp is not None and spec not in ("none",):
            compressors[spec] = comp
    try:
        report = run_evaluate(
            model,
            processor,
            dataset,
            list(args.methods),
            args.rate,
            compressors=compressors,
            history=args.history,
            max_dialogues=args.max_dialogues,
            device=args.device,
            batch_size=args.batch_size,
            dataset_name=args.data,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    _print_report(report)
    if args.json:
        from mc_core.io import write_json

        print(f"wrote {write_json(args.json, report)}")
    return 0


def _print_report(report: dict) -> None:
    methods = report["methods"]
    turns = len(next(iter(methods.values()))["acc_turn"])
    width = max(len("method"), *(len(m) for m in methods))
    head = ["method".ljust(width), *(f"turn {k + 1}" for k in range(turns)), "  avg", " tokens"]
    print(f"rate {report['rate']} | {report['dialogues']} dialogues | history {report['history']}")
    print("  ".join(head))
    for name, m in methods.items():
        cells = [name.ljust(width), *(f"{a:6.3f}" for a in m["acc_turn"]), f"{m['acc_avg']:5.3f}"]
        cells.append(f"{m['visual_tokens']:7.1f}")
        print("  ".join(cells))


def list_registry(args) -> int:
    from mc_core.compressors import available

    print("methods: " + ", ".join(available()))
    uri = mc_registry.tracking_uri()
    _check_registry(uri, "list")
    try:
        models = mc_registry.registered_models(uri=uri)
    except ImportError as err:  # an install without MLflow
        raise UsageError(f"the MLflow registry is unavailable ({err})") from None
    print(f"registry {uri}: {len(models)} registered compressor(s)")
    for entry in models:
        print(_describe(entry))
    return 0


def _describe(entry) -> str:
    """One line of `list`: a registered model, its champion and the champion's run metrics."""
    if entry.version is None:
        return f"  {entry.name}: no champion"
    line = f"  {entry.name}: champion v{entry.version} {entry.metric}={entry.score}"
    metrics = entry.run_metrics
    keys = sorted(k for k in metrics if "/" not in k or k.startswith(("eval/", "final/")))
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys[:8])
    if shown:
        line += f" | {shown}"
    return line


COMMANDS: dict[str, Callable] = {
    "chat": chat,
    "compress": compress,
    "evaluate": evaluate,
    "list": list_registry,
    "plan": plan,
}
