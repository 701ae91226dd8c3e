"""Stage ``evaluate-any@<arch>``: the arch's any-rate compressor at every rate it is compared at.

Reads ``models/base/<arch>``, ``models/compressors/<arch>-any``, ``data/test`` and ``data/val``;
writes ``reports/eval/<arch>-any.json``. The rates are ``grid.rates`` (where the cells' per-rate
compressors and heuristics were evaluated by ``evaluate@<arch>-<rate>``, on the same dialogues)
and ``grid.probe_rates`` (rates no cell trains at). The report holds:

- ``rates.<rate>.methods`` (data/test): ``<train.method>-any`` (method key, e.g.
  ``metacompress-any``) where the compressor serves the rate (its trained span), and at a probe
  rate the heuristics of ``evaluate.probe_methods`` beside it, each with its per-dialogue
  scores (``acc_dialogues``) for paired comparisons; with ``train.seeds`` > 1, at the grid
  rates the extra seeds' scores too (``seeds``, as a cell's report holds them);
- ``validation.rates.<rate>.methods`` (data/val): the same, plus ``register.gate_baseline``
  and the registry's current champion of ``metacompress-<arch>-any`` at the grid's rates;
- ``methods`` and ``validation.methods``: the averages over ``grid.rates`` (``acc_avg``,
  ``kl_to_full``) that ``tasks.register``'s gate ranks the version by, as for a cell.

The paired differences (any-rate - per-rate at each grid rate; any-rate - the best heuristic at
each probe rate, the best chosen on data/val) are the report stage's (``tasks.report``), which
reads the cells' reports beside this one. Logs the numbers to the compressor's training run.

Usage: ``python -m tasks.evaluate_any --arch tiny-llava``
"""

from __future__ import annotations

from tasks import cells, common, lineage, tracking

PARAMS = ("grid", "evaluate", "register", "train", "tracking")
AVERAGED = ("acc_avg", "kl_to_full")  # what the gate may rank by: register.champion_metric


def main(argv: list[str] | None = None) -> None:
    """Evaluate the any-rate compressor and write its report."""
    p = common.load_params(PARAMS, who="tasks.evaluate_any")
    arch = common.arch_args(__doc__.splitlines()[0], argv)

    from mc_core.compressors import checkpoint
    from mc_core.data import schema
    from mc_core.models import zoo

    ckpt_dir = cells.compressor_dir(arch, cells.ANY)
    family = zoo.info(cells.base_dir(arch)).get("family")
    compressor = checkpoint.load_compressor(ckpt_dir, expect={"family": family})
    if compressor.trained_rates is None:
        raise ValueError(
            f"{ckpt_dir}: a single-rate checkpoint (no 'rates' in compressor.json); the "
            "any-rate stage needs one trained with train.any_rate.rates"
        )
    model, processor = zoo.load(cells.base_dir(arch))
    ckpt = lineage.checkpoint_hash(ckpt_dir)
    name = cells.any_method(p.train.method)
    comps = {name: compressor}
    test = schema.load(common.DATA_TEST)
    report = {
        "arch": arch,
        "method": name,
        "trained_rates": list(compressor.trained_rates),
        "span": list(compressor.rate_span()),
        "nominal_rate": compressor.rate,
        "grid_rates": list(p.grid.rates),
        "probe_rates": list(p.grid.probe_rates),
        "dataset": test[0]["source"],
        "n_dialogues": None,
        "rates": _sweep(p, model, processor, test, comps, arch, p.evaluate.max_dialogues),
    }
    _seeds(p, arch, model, processor, test, family, report["rates"], name)
    first = next(iter(report["rates"].values()))
    report["n_dialogues"] = first["n_dialogues"]
    report["methods"] = _averages(report["rates"], p.grid.rates, [name])
    if schema.is_saved_dataset(common.DATA_VAL):
        report["validation"] = _validation(p, arch, model, processor, comps, family, ckpt)
    out = common.write_json(cells.cell_file("eval", arch, cells.ANY), report)

    run_id = tracking.cell_run_for(p.tracking.experiment, arch, cells.ANY, ckpt)
    tracking.log_metrics(run_id, _flat(report))
    tracking.log_artifacts(run_id, out, "eval")
    got = {r: e["methods"].get(name, {}).get("acc_avg") for r, e in report["rates"].items()}
    print(f"evaluate-any: wrote {out} ({name} acc_avg by rate: {got})", flush=True)


def _sweep(
    p, model, processor, dataset, comps: dict, arch: str, limit: int | None, extra=()
) -> dict:
    """``{rate: {"n_dialogues", "methods"}}`` over ``grid.any_rates()``: the any-rate
    compressor where it serves the rate, the probe heuristics at the probe rates, ``extra``
    (the gate's baseline and champion on data/val) at the grid's rates."""
    from mc_core.evaluation import runner as meval

    ev, (name, comp) = p.evaluate, next(iter(comps.items()))
    out = {}
    for rate in p.grid.any_rates():
        probe = rate not in p.grid.rates
        names = [name] if comp.serves(rate) else []
        names += ev.probe_heuristics() if probe else [m for m in extra if m != name]
        if not names:
            continue
        metrics = meval.evaluate(
            model,
            processor,
            dataset,
            list(dict.fromkeys(names)),
            rate,
            compressors=comps,
            max_dialogues=limit,
            arch=arch,
            dataset_name=dataset[0]["source"],
            progress=ev.progress,
            **ev.run_kwargs(),
        )
        out[cells.format_rate(rate)] = {
            "n_dialogues": metrics["n_dialogues"],
            "methods": metrics["methods"],
        }
    return out


def _seeds(p, arch: str, model, processor, dataset, family: str, rates: dict, name: str) -> None:
    """At each grid rate, the test scores of the any-rate compressor's extra seeds
    (``train.seeds`` > 1, ``models/compressors/<arch>-any-seeds/``) under its entry's
    ``seeds``, as a cell records its own: the comparison with the per-rate compressors then
    pairs seed means and covers the spread between seeds."""
    from tasks.evaluate import seed_spread

    folder, seed = cells.seeds_dir(arch, cells.ANY), p.train.for_any(arch).seed
    for rate in p.grid.rates:
        entry = rates.get(cells.format_rate(rate), {}).get("methods", {}).get(name)
        if entry is None:
            continue
        seeds = seed_spread(p, folder, rate, model, processor, dataset, family, entry, seed)
        if seeds is None:
            return  # one seed: nothing to add at any rate
        entry["seeds"] = seeds


def _averages(rates: dict, grid_rates, names) -> dict:
    """Per method of ``names``, the mean of each :data:`AVERAGED` metric over the grid's rates
    (the rates every method of ``names`` was evaluated at), with the per-rate values."""
    out = {}
    for m in names:
        at = [rates[cells.format_rate(r)]["methods"].get(m) for r in grid_rates]
        if any(e is None for e in at):
            continue  # not evaluated at every grid rate (a span that misses one)
        entry = {"rates": [float(r) for r in grid_rates]}
        for key in AVERAGED:
            if all(key in e for e in at):
                entry[key] = sum(float(e[key]) for e in at) / len(at)
                entry[f"{key}_by_rate"] = [float(e[key]) for e in at]
        out[m] = entry
    return out


def _validation(p, arch: str, model, processor, comps: dict, family: str, ckpt: str) -> dict:
    """The sweep on data/val with the gate's baseline and the current champion of the arch's
    any-rate model (when it is another checkpoint), and their grid-rate averages."""
    from mc_core.data import schema
    from tasks.evaluate import champion_compressor

    val = schema.load(common.DATA_VAL)
    name = next(iter(comps))
    base = lineage.checkpoint_hash(cells.base_dir(arch))
    reg_name = p.register.model_name(arch, cells.ANY, p.train.method)
    champion = champion_compressor(reg_name, family, ckpt, base)
    comps = dict(comps)
    extra = [p.register.gate_baseline]
    if champion is not None and champion["compressor"] is not None:
        comps["champion"] = champion["compressor"]
        extra.append("champion")
    rates = _sweep(p, model, processor, val, comps, arch, None, extra=extra)
    out = {
        "dataset": val[0]["source"],
        "n_dialogues": next(iter(rates.values()))["n_dialogues"],
        "rates": rates,
        "methods": _averages(rates, p.grid.rates, [name, *extra]),
    }
    if champion is not None:
        entry = out["methods"].setdefault("champion", {})
        entry.update(
            {"version": champion["version"], "same_checkpoint": champion["compressor"] is None}
        )
    return out


def _flat(report: dict) -> dict[str, float]:
    """``any/<split>/<rate>/<method>/acc_avg`` and the averages, for the MLflow run."""
    flat = {}
    splits = [("test", report)] + (
        [("val", report["validation"])] if "validation" in report else []
    )
    for split, sec in splits:
        for rate, entry in sec["rates"].items():
            for m, e in entry["methods"].items():
                if "acc_avg" in e:
                    flat[f"any/{split}/{rate}/{m}/acc_avg"] = float(e["acc_avg"])
        for m, e in sec["methods"].items():
            if "acc_avg" in e:
                flat[f"any/{split}/mean/{m}/acc_avg"] = float(e["acc_avg"])
    return flat


if __name__ == "__main__":
    with common.stage("evaluate-any"):
        main()
