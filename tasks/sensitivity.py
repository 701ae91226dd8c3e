"""FastV's layer K and the adapters' position mode, each varied on one cell (not a DVC stage).

FastV ranks the visual tokens by the attention the first prompt's last token pays them at LLM
layer K; the paper uses K = 2 (an ordinary layer of the 4-layer tiny teachers, whose object
pointer is trained on the last layer; K beyond the LLM is capped at its last layer). This
script reports FastV for K in ``--layers`` (the layer actually read is recorded, with how much
the question steers that layer's choice: `mc_core.evaluation.probe.question_overlap`) and, for
``sample`` and the cell's trained compressor, both position modes of the adapters
(``packed``: consecutive positions, the HF convention; ``source``: each compressed token at
the P-weighted position of its sources). Dialogues: the first ``--dialogues`` of data/test;
settings from ``params.yaml: evaluate``. Writes ``reports/sensitivity/<arch>-<rate>.json`` and
its plot (``.png`` beside it, `mc_core.evaluation.plots.fastv_layers`)::

    {"arch", "rate", "dataset", "n_dialogues", "layers": {"K0": {"layer", "acc_turn",
     "acc_avg", "acc_avg_ci", ..., "question_overlap": {"overlap", "overlap_ci", "chance",
     "dialogues", "centre_recall"}}, ...}, "positions": {"packed": {method: {...}},
     "source": {...}}, "default_positions"}

Usage: ``python -m tasks.sensitivity --arch tiny-qwen2-vl --rate 0.9 [--dialogues 96]
[--layers 0,1,2] [--positions packed,source]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks import cells, common

PARAMS = ("evaluate", "train")


def _args(argv: list[str] | None) -> tuple[argparse.Namespace, list[int], list[str]]:
    """The command line, checked: ``(namespace, layers K, position modes)``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--rate", required=True, type=float)
    ap.add_argument("--layers", default="0,1,2", help="FastV layers K, comma-separated")
    ap.add_argument(
        "--positions", default="packed,source", help="adapter position modes, comma-separated"
    )
    ap.add_argument("--dialogues", type=int, default=96, help="first N test dialogues")
    ap.add_argument("--out", type=Path, help="default: reports/sensitivity/<arch>-<rate>.json")
    ns = ap.parse_args(argv)
    try:
        layers = [int(k) for k in ns.layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers={ns.layers!r}: expected comma-separated ints") from None
    if any(k < 0 for k in layers) or ns.dialogues < 1:
        raise ValueError(
            f"--layers={ns.layers!r} / --dialogues={ns.dialogues}: expected "
            "layers >= 0 and at least one dialogue"
        )
    from mc_core.models.adapters import POSITIONS

    modes = ns.positions.split(",")
    if not modes or set(modes) - set(POSITIONS):
        raise ValueError(f"--positions={ns.positions!r}: expected some of {POSITIONS}")
    return ns, layers, modes


def _layer_sweep(model, processor, dataset, rate: float, layers: list[int], kw: dict, seed: int):
    """FastV at each layer K: ``(evaluate's result, {"K<k>": its entry in the report})``."""
    from mc_core.compressors import build
    from mc_core.evaluation import probe
    from mc_core.evaluation import runner as meval
    from mc_core.runtime import token_dim

    n_layers = int(model.config.get_text_config().num_hidden_layers)
    read = {k: min(k, n_layers - 1) for k in layers}  # K beyond the LLM reads its last layer
    fastv = {}
    for k in layers:
        comp = build("fastv", rate=rate, dim=token_dim(model))
        comp.layer = (
            k  # read by mc_core.inference.compress.compress_inputs (capped at the last layer)
        )
        fastv[f"K{k}"] = comp
    res = meval.evaluate(model, processor, dataset, list(fastv), rate, compressors=fastv, **kw)
    steer = probe.question_overlap(
        model,
        processor,
        dataset,
        rate,
        sorted(set(read.values())),
        max_dialogues=kw["max_dialogues"],
        seed=seed,
    )
    entries = {}
    for name, m in res["methods"].items():
        k = int(name[1:])
        entries[name] = {
            "requested": k,
            "layer": read[k],
            **m,
            "question_overlap": steer[read[k]],
        }
    return res, entries


def main(argv: list[str] | None = None) -> None:
    """Run both sweeps on the cell and write the report."""
    ns, layers, modes = _args(argv)
    p = common.load_params(PARAMS, who="tasks.sensitivity")
    common.check_cell(ns.arch, ns.rate)

    from mc_core.compressors import checkpoint
    from mc_core.data import schema
    from mc_core.evaluation import plots
    from mc_core.evaluation import runner as meval
    from mc_core.models import zoo
    from mc_core.models.families import adapter_for

    model, processor = zoo.load(cells.base_dir(ns.arch))
    family = zoo.info(cells.base_dir(ns.arch)).get("family")
    dataset = schema.load(common.DATA_TEST)
    ev = p.evaluate
    kw = {
        **ev.run_kwargs(),
        "max_dialogues": ns.dialogues,
        "progress": ev.progress,
        "arch": ns.arch,
        "dataset_name": dataset[0]["source"],
    }
    by_layer, entries = _layer_sweep(model, processor, dataset, ns.rate, layers, kw, ev.seed)
    out = {
        "arch": ns.arch,
        "rate": ns.rate,
        "dataset": by_layer["dataset"],
        "n_dialogues": by_layer["n_dialogues"],
        "layers": entries,
        "positions": {},
        "default_positions": adapter_for(model).positions,
    }
    trained = {}
    ckpt = cells.compressor_dir(ns.arch, ns.rate)
    if ckpt.is_dir():
        trained[p.train.method] = checkpoint.load_compressor(ckpt, expect={"family": family})
    for mode in modes:
        res = meval.evaluate(
            model,
            processor,
            dataset,
            ["sample", *trained],
            ns.rate,
            compressors=trained,
            adapter=adapter_for(model, positions=mode),
            **kw,
        )
        out["positions"][mode] = res["methods"]
    path = ns.out or cells.cell_file("sensitivity", ns.arch, ns.rate)
    common.write_json(path, out)
    png = plots.fastv_layers(out, Path(path).with_suffix(".png"))
    print(f"sensitivity: wrote {path} and {png}", flush=True)


if __name__ == "__main__":
    with common.stage("sensitivity"):
        main()
