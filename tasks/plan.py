"""Cost plan of the params file's grid, before any GPU is rented: per cell (and per any-rate
compressor of ``grid.any_rate_archs``) the micro-batch that fits the GPU, its peak memory,
FLOPs and GPU-hours; per arch the disk of the target store.

    python -m tasks.plan [--params FILE] [--profile NAME] [--gpu NAME] [--gpus N]
                         [--utilization U] [--backward-factor F] [--json]

The params are read and validated as every stage reads them (``tasks.params``); each cell's
recipe is its ``train`` section with the overrides applied. The planning is
``mc_core.training.plan`` (its docstring states every assumption); this is its entry point.
``--gpus`` defaults to ``train.distributed.nproc_per_node``. Sequence shapes come from the
prepared ``data/train`` where the arch's processor is at hand (tiny archs), else from stated
assumptions (real models).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tasks import params as tparams

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from mc_core.training.plan import GPUS

    ap = argparse.ArgumentParser(prog="python -m tasks.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=tparams.DEFAULT_PATH, help="params file (params.yaml)")
    ap.add_argument(
        "--profile", default=None, help=f"a profile overlay: {', '.join(tparams.PROFILES)}"
    )
    ap.add_argument("--gpu", default="h100", help=f"GPU model: {', '.join(GPUS)} (default h100)")
    ap.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: params)")
    ap.add_argument(
        "--utilization", type=float, default=0.35, help="assumed model-FLOP utilisation (0.35)"
    )
    ap.add_argument(
        "--backward-factor", type=float, default=2.0, help="assumed backward / forward FLOPs (2)"
    )
    ap.add_argument("--data", default="data/train", help="prepared dialogues for the shapes")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _load(path: str, profile: str | None) -> tparams.Params:
    if profile is None:
        p = tparams.load(path)
    else:
        raw = tparams.profile_params(profile, tparams.read_yaml(path))
        p = tparams.validate(raw, source=f"{path} (profile {profile})")
    assert isinstance(p, tparams.Params)
    return p


def _dialogues(p: tparams.Params, data: str) -> int:
    """Training dialogues: ``data.train.dialogues``, else the prepared split's count."""
    if p.data.train.dialogues is not None:
        return p.data.train.dialogues
    if Path(data).is_dir():
        from mc_core.data import schema

        return len(schema.load(data))
    raise ValueError(
        "data.train.dialogues is null (every dialogue of the source) and no prepared "
        f"{data} to count: set data.train.dialogues or run the prepare stage"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan; exit status 2 with one line on a bad argument or params file."""
    args = _parser().parse_args(argv)
    try:
        from mc_core.training import plan
        from mc_core.training.plan_inputs import arch_input

        p = _load(args.params, args.profile)
        gpus = args.gpus if args.gpus is not None else p.train.distributed.nproc_per_node
        setup = plan.Setup(
            plan.get_gpu(args.gpu, where="--gpu"),
            gpus=gpus,
            utilization=args.utilization,
            backward_factor=args.backward_factor,
        )
        data = args.data if Path(args.data).is_dir() else None
        inputs = [arch_input(arch, data_dir=data) for arch in p.grid.archs]
        result = plan.plan_grid(
            inputs,
            list(p.grid.rates),
            p.train.for_cell,
            dialogues=_dialogues(p, args.data),
            setup=setup,
            any_for=p.train.for_any,
            any_archs=list(p.grid.any_rate_archs),
        )
    except ValueError as err:
        print(f"tasks.plan: error: {err}", file=sys.stderr)
        return 2
    label = args.params + (f" (profile {args.profile})" if args.profile else "")
    print(json.dumps(result, indent=2) if args.json else plan.format_plan(result, label=label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
