"""Stage ``evaluate@<arch>-<rate>``: every method of ``evaluate.methods`` at the cell's rate.

Reads the base model, the cell's trained compressor, ``data/test`` and ``data/val``; writes
``reports/eval/<arch>-<rate>.json`` (the metrics schema of docs/contracts.md, a DVC metric) and
``reports/tokens/<arch>-<rate>.png`` (for a few test images, where MetaCompress's P draws its
tokens from beside what FastV keeps), and logs the metrics (``eval/<method>/<metric>``), the
files and a per-turn accuracy plot to the cell's MLflow run.

Beside ``methods`` (on data/test, each with ``acc_avg_ci``, and ``n_dialogues``) the report
holds ``ceilings`` (``evaluate.ceilings``: selector, oracle, cls_overlap;
mc_core/evaluation/ceilings.py)
and, when data/val holds a dataset, ``validation``: ``train.method``, ``evaluate.val_methods``
and the registry's current champion (``champion``, with its ``version``) on data/val, which
``tasks.register``'s gate reads. Nothing is chosen on data/test.

Usage: ``python -m tasks.evaluate --arch tiny-llava --rate 0.9``
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mc_registry
from mc_core.io import staged_file
from tasks import cells, common, lineage, tracking

PARAMS = ("evaluate", "register", "train", "tracking")


def main(argv: list[str] | None = None) -> None:
    """Evaluate the cell and record the metrics."""
    p = common.load_params(PARAMS, who="tasks.evaluate")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv)

    from mc_core.compressors import checkpoint
    from mc_core.data import schema
    from mc_core.evaluation import runner as meval
    from mc_core.evaluation.ceiling_report import evaluate_ceilings
    from mc_core.models import zoo

    ckpt_dir = cells.compressor_dir(arch, rate)
    family = zoo.info(cells.base_dir(arch)).get("family")
    # The fingerprint check refuses a compressor trained for another model family.
    compressor = checkpoint.load_compressor(ckpt_dir, expect={"family": family})
    model, processor = zoo.load(cells.base_dir(arch))
    dataset = schema.load(common.DATA_TEST)
    ev = p.evaluate
    metrics = meval.evaluate(
        model,
        processor,
        dataset,
        ev.methods,
        rate,
        compressors={p.train.method: compressor},
        max_dialogues=ev.max_dialogues,
        arch=arch,
        dataset_name=dataset[0]["source"],
        progress=ev.progress,
        **ev.run_kwargs(),
    )
    if ev.ceilings.enabled:
        c = ev.ceilings
        metrics["ceilings"] = evaluate_ceilings(
            model,
            processor,
            dataset,
            rate,
            oracle_dialogues=c.oracle_dialogues,
            oracle_steps=c.oracle_steps,
            oracle_lr=c.oracle_lr,
            oracle_eps=c.oracle_eps,
            max_dialogues=ev.max_dialogues,
            **ev.run_kwargs(),
        )
    seeds = seed_spread(
        p,
        cells.seeds_dir(arch, rate),
        rate,
        model,
        processor,
        dataset,
        family,
        metrics["methods"][p.train.method],
        p.train.for_cell(arch, rate).seed,
    )
    if seeds:
        metrics["methods"][p.train.method]["seeds"] = seeds
    ckpt = lineage.checkpoint_hash(ckpt_dir)
    if schema.is_saved_dataset(common.DATA_VAL):
        metrics["validation"] = _validation(
            p, arch, rate, model, processor, compressor, family, ckpt
        )
    out = meval.write_report(metrics, cells.cell_file("eval", arch, rate))
    tokens_png = _token_maps(model, processor, dataset, compressor, rate, arch)

    rate_s = cells.format_rate(rate)
    run_id = tracking.cell_run_for(p.tracking.experiment, arch, rate_s, ckpt)
    tracking.log_params(run_id, common.flat("evaluate", ev.model_dump()))
    flat = _flat_metrics(metrics)
    tracking.log_metrics(run_id, flat)
    tracking.log_artifacts(run_id, out, "eval")
    tracking.log_artifacts(run_id, tokens_png, "plots")
    with tempfile.TemporaryDirectory() as tmp:  # the per-turn plot, for the run page only
        from mc_core.evaluation import plots

        png = Path(tmp) / f"turns-{cells.cell_key(arch, rate)}.png"
        png = plots.accuracy_per_turn(metrics, png)
        tracking.log_artifacts(run_id, png, "plots")
    tracking.set_tags(run_id, {"eval_dataset": metrics.get("dataset", "unknown")})
    mc = metrics["methods"].get(p.train.method, {})
    print(f"evaluate: wrote {out} ({p.train.method} acc_avg={mc.get('acc_avg')})", flush=True)


def _key(label: str) -> str:
    """A dataset's own label ("yes/no", "choose", ...) as part of an MLflow metric key, which
    takes word characters, '/', '.', '-', ' ' and ':' only."""
    return re.sub(r"[^\w/.\- :]", "_", label)


def _flat_metrics(metrics: dict) -> dict[str, float]:
    """``<split>/<method>/<key>`` scalars (lists become ``_1``, ``_2``..., the accuracy per
    question type ``acc_by_type/<type>``) for MLflow. The per-dialogue scores stay in the
    report artifact: hundreds of metrics per method are noise in the run page."""
    flat = {}
    sections = [("eval", metrics["methods"])]
    sections += [("val", metrics["validation"]["methods"])] if "validation" in metrics else []
    sections += [
        ("ceiling", {k: v for k, v in metrics.get("ceilings", {}).items() if "acc_avg" in v})
    ]
    for prefix, methods in sections:
        for method, m in methods.items():
            for key, value in m.items():
                if key in ("indices", "acc_dialogues"):
                    continue
                if isinstance(value, list):
                    flat.update(
                        {f"{prefix}/{method}/{key}_{i + 1}": v for i, v in enumerate(value)}
                    )
                elif key == "acc_by_type" and value:
                    flat.update(
                        {f"{prefix}/{method}/{key}/{_key(t)}": v["acc"] for t, v in value.items()}
                    )
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    flat[f"{prefix}/{method}/{key}"] = value
    return flat


def _validation(
    p, arch: str, rate: float, model, processor, compressor, family: str, ckpt: str
) -> dict:
    """``train.method``, ``evaluate.val_methods`` and the current champion on data/val."""
    from mc_core.data import schema
    from mc_core.evaluation import runner as meval

    ev, method = p.evaluate, p.train.method
    val = schema.load(common.DATA_VAL)
    comps = {method: compressor}
    base = lineage.checkpoint_hash(cells.base_dir(arch))
    champion = champion_compressor(p.register.model_name(arch, rate, method), family, ckpt, base)
    if champion is not None and champion["compressor"] is not None:
        comps["champion"] = champion["compressor"]
    names = [
        method,
        *[m for m in ev.val_methods if m != method],
        *(["champion"] if "champion" in comps else []),
    ]
    report = meval.evaluate(
        model,
        processor,
        val,
        names,
        rate,
        compressors=comps,
        arch=arch,
        dataset_name=val[0]["source"],
        progress=ev.progress,
        **ev.run_kwargs(),
    )
    out = {
        "dataset": report["dataset"],
        "n_dialogues": report["n_dialogues"],
        "methods": report["methods"],
    }
    if champion is not None:
        entry = out["methods"].get("champion", {})
        entry.update(
            {"version": champion["version"], "same_checkpoint": champion["compressor"] is None}
        )
        out["methods"]["champion"] = entry
    return out


def seed_spread(
    p, folder, rate: float, model, processor, dataset, family: str, first: dict, seed: int
) -> dict | None:
    """Test scores of the extra-seed compressors in ``folder`` (``train.seeds`` > 1) beside the
    first seed's (``first``: its method entry, trained with ``seed``): ``{"seeds", "acc_avg",
    "acc_dialogues", "mean", "sd"}``, the per-dialogue scores one list per seed (the first's
    first) so that comparisons can pair dialogues across seeds; None for one seed."""
    from mc_core.compressors import checkpoint
    from mc_core.evaluation import runner as meval
    from mc_core.evaluation.stats import mean_sd

    folder = Path(folder)
    dirs = (
        sorted(folder.glob("seed-*"), key=lambda d: int(d.name.split("-")[1]))
        if folder.is_dir()
        else []
    )
    if not dirs:
        return None
    ev = p.evaluate
    comps = {d.name: checkpoint.load_compressor(d, expect={"family": family}) for d in dirs}
    report = meval.evaluate(
        model,
        processor,
        dataset,
        list(comps),
        rate,
        compressors=comps,
        max_dialogues=ev.max_dialogues,
        progress=ev.progress,
        **ev.run_kwargs(),
    )
    got = [report["methods"][d.name] for d in dirs]
    accs = [first["acc_avg"]] + [e["acc_avg"] for e in got]
    mean, sd = mean_sd(accs)
    out = {
        "seeds": [seed] + [int(d.name.split("-")[1]) for d in dirs],
        "acc_avg": accs,
        "mean": mean,
        "sd": sd,
    }
    if "acc_dialogues" in first:
        out["acc_dialogues"] = [first["acc_dialogues"]] + [e["acc_dialogues"] for e in got]
    return out


def champion_compressor(name: str, family: str, ckpt: str, base: str) -> dict | None:
    """The registry's current champion of this cell: ``{"version", "compressor"}`` (compressor
    None when it is this very checkpoint), or None when the cell has no champion yet or its
    champion was trained against another base model (``base``: this one's content hash)."""
    found = mc_registry.champion(name, base_sha256=base)  # with its tags: one registry read
    if found is None:
        return None
    version, _, tags = found
    if tags.get("ckpt_sha256") == ckpt:
        return {"version": version, "compressor": None}
    comp = mc_registry.load_compressor(
        mc_registry.model_uri(name, version=version), expect={"family": family}
    )
    return {"version": version, "compressor": comp}


def _token_maps(model, processor, dataset, compressor, rate: float, arch: str) -> Path:
    """The token-map figure of the first test images: the trained P's column mass beside
    FastV's choice."""
    from mc_core.compressors import build
    from mc_core.evaluation import plots
    from mc_core.evaluation.token_maps import token_maps

    fastv = build("fastv", rate=rate, dim=compressor.dim)
    maps = token_maps(
        model,
        processor,
        dataset,
        {compressor.name: compressor, "fastv": fastv},
        indices=range(min(3, len(dataset))),
    )
    path = cells.cell_file("tokens", arch, rate, ".png")
    with staged_file(path, suffix=".png") as tmp:  # no half-written figure at the declared out
        plots.token_maps_figure(maps, tmp, left=compressor.name)
    return path


if __name__ == "__main__":
    with common.stage("evaluate"):
        main()
