"""Stage ``register@<arch>-<rate>``: the cell's compressor into the MLflow model registry.

Registered model ``metacompress-<arch>-r<rate>`` (``register.name_template``); a new version
only when the checkpoint's content hash is new; alias ``champion`` on the best version by
``register.champion_metric`` of metacompress in ``reports/eval/<arch>-<rate>.json``. Writes
``reports/registry/<arch>-<rate>.json`` (name, version, whether it was created, champion), the
small output that lets DVC skip this stage when nothing changed.

Usage: ``python -m tasks.register --arch tiny-llava --rate 0.9``
"""

from __future__ import annotations

import json

from tasks import common, tracking

PARAMS = ("register", "tracking")


def main(argv: list[str] | None = None) -> None:
    """Register (or find) the cell's version and move the champion alias."""
    p = common.load_params(PARAMS, who="tasks.register")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv)
    rate_s = common.config.format_rate(rate)
    ckpt_dir = common.compressor_dir(arch, rate)
    eval_file = common.cell_file("eval", arch, rate)
    metrics = json.loads(eval_file.read_text())
    metric = p.register.champion_metric
    try:
        score = float(metrics["methods"]["metacompress"][metric])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{eval_file}: no methods.metacompress.{metric} to rank the version "
                         f"by (register.champion_metric={metric!r})") from None

    ckpt = tracking.checkpoint_hash(ckpt_dir)
    run_id = tracking.find_cell_run(p.tracking.experiment, arch, rate_s, ckpt_sha256=ckpt)
    if run_id is None:
        run_id = tracking.start_cell_run(p.tracking.experiment, arch, rate_s,
                                         params={"arch": arch, "rate": rate},
                                         tags={"ckpt_sha256": ckpt, "restored": "true"})
        tracking.end_run(run_id)
    lineage = {"arch": arch, "rate": rate_s, "git_sha": tracking.git_sha(),
               "experiment": p.tracking.experiment,
               "eval_dataset": metrics.get("dataset", "unknown"),
               **tracking.dvc_hashes([str(common.base_dir(arch)), str(common.DATA_TRAIN),
                                      str(common.DATA_TEST), str(ckpt_dir)])}
    reg = tracking.register_checkpoint(
        p.register.model_name(arch, rate), ckpt_dir, run_id=run_id, score=score, metric=metric,
        higher_is_better=(metric == "acc_avg"), tags=lineage)
    out = common.write_json(common.cell_file("registry", arch, rate),
                            {**reg.to_dict(), "uri": f"models:/{reg.name}@champion"})
    verb = "registered" if reg.created else "already registered"
    print(f"register: {reg.name} v{reg.version} {verb}; champion v{reg.champion} -> {out}",
          flush=True)


if __name__ == "__main__":
    main()
