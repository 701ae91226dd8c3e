"""Stage ``evaluate@<arch>-<rate>``: every method of ``evaluate.methods`` at the cell's rate.

Reads the base model, the cell's trained compressor and ``data/test``; writes
``reports/eval/<arch>-<rate>.json`` (DESIGN.md metrics schema, a DVC metric) and
``reports/tokens/<arch>-<rate>.png`` (for a few test images, where MetaCompress's P draws its
tokens from beside what FastV keeps), and logs the metrics (``eval/<method>/<metric>``), the
files and a per-turn accuracy plot to the cell's MLflow run.

Usage: ``python -m tasks.evaluate --arch tiny-llava --rate 0.9``
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks import common, tracking

PARAMS = ("evaluate", "tracking")


def main(argv: list[str] | None = None) -> None:
    """Evaluate the cell and record the metrics."""
    p = common.load_params(PARAMS, who="tasks.evaluate")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv)

    from mc_core import checkpoint, zoo
    from mc_core import evaluate as meval
    from mc_core.data import schema

    ckpt_dir = common.compressor_dir(arch, rate)
    family = zoo.info(common.base_dir(arch)).get("family")
    # The fingerprint check refuses a compressor trained for another model family.
    compressor = checkpoint.load_compressor(ckpt_dir, expect={"family": family})
    model, processor = zoo.load(common.base_dir(arch))
    dataset = schema.load(common.DATA_TEST)
    ev = p.evaluate
    metrics = meval.evaluate(
        model, processor, dataset, ev.methods, rate,
        compressors={"metacompress": compressor}, history=ev.history,
        max_dialogues=ev.max_dialogues, device=ev.device, batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens, arch=arch, dataset_name=dataset[0]["source"],
        seed=ev.seed, progress=ev.progress)
    out = meval.write_report(metrics, common.cell_file("eval", arch, rate))
    tokens_png = _token_maps(model, processor, dataset, compressor, rate, arch)

    rate_s = common.config.format_rate(rate)
    ckpt = tracking.checkpoint_hash(ckpt_dir)
    run_id = tracking.find_cell_run(p.tracking.experiment, arch, rate_s, ckpt_sha256=ckpt)
    if run_id is None:  # train stage restored from DVC's cache: record the cell anew
        run_id = tracking.start_cell_run(p.tracking.experiment, arch, rate_s,
                                         params={"arch": arch, "rate": rate},
                                         tags={"ckpt_sha256": ckpt, "restored": "true"})
        tracking.end_run(run_id)
    tracking.log_params(run_id, common.flat("evaluate", ev.model_dump()))
    flat = {}
    for method, m in metrics["methods"].items():
        for key, value in m.items():
            if isinstance(value, list):
                flat.update({f"eval/{method}/{key}_{i + 1}": v for i, v in enumerate(value)})
            else:
                flat[f"eval/{method}/{key}"] = value
    tracking.log_metrics(run_id, flat)
    tracking.log_artifacts(run_id, out, "eval")
    tracking.log_artifacts(run_id, tokens_png, "plots")
    with tempfile.TemporaryDirectory() as tmp:  # the per-turn plot, for the run page only
        from mc_core import plots

        png = plots.accuracy_per_turn(metrics, Path(tmp) / f"turns-{arch}-{rate_s}.png")
        tracking.log_artifacts(run_id, png, "plots")
    tracking.set_tags(run_id, {"eval_dataset": metrics.get("dataset", "unknown")})
    mc = metrics["methods"].get("metacompress", {})
    print(f"evaluate: wrote {out} (metacompress acc_avg={mc.get('acc_avg')})", flush=True)


def _token_maps(model, processor, dataset, compressor, rate: float, arch: str) -> Path:
    """The token-map figure of the first test images: P's column mass beside FastV's choice."""
    from mc_core import evaluate as meval
    from mc_core import plots
    from mc_core.compressors import build

    fastv = build("fastv", rate=rate, dim=compressor.dim)
    maps = meval.token_maps(model, processor, dataset,
                            {"metacompress": compressor, "fastv": fastv},
                            indices=range(min(3, len(dataset))))
    path = common.cell_file("tokens", arch, rate, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    plots.token_maps_figure(maps, tmp)
    tmp.replace(path)  # atomic: no half-written figure at the declared out
    return path


if __name__ == "__main__":
    main()
