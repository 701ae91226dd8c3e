"""Stage ``register@<arch>-<rate>``: the cell's compressor into the MLflow model registry.

Registered model ``register.name_template`` (e.g. ``metacompress-<arch>-r<rate>``); a new
version only when the checkpoint's content hash is new. Each version is an MLflow pyfunc model
of the checkpoint and the cell's base model (``mc_registry.mlmodel``: signature, input example,
lineage metadata), so ``mlflow.pyfunc.load_model(<uri>)`` and ``mlflow models serve`` take it;
a checkpoint registered before as a plain folder gets one such version, and the alias follows
it when the folder held it. Gated (``register.gate``, with data/val):
the version takes the alias ``champion`` only if on data/val it beats ``register.gate_baseline``
and the current champion by ``register.champion_metric`` (``gate``); otherwise it is registered
without the alias and the stage prints why. Its ``score`` tag is then the validation score
(``test_score`` keeps the test one). Without data/val the alias goes to the best test score, as
before. Writes ``reports/registry/<arch>-<rate>.json`` (name, version, whether it was created,
champion, and ``gate``: promote, reason, the scores compared), the small output that lets DVC
skip this stage when nothing changed.

Stage ``register-any@<arch>`` (``--rate any``) registers the arch's any-rate compressor the
same way as ``register.any_name_template`` (``metacompress-<arch>-any``), its trained rates in
the tags (``rates``, ``rate_lo``, ``rate_hi``), gated by its ``reports/eval/<arch>-any.json``:
the averages over ``grid.rates`` on data/val (``tasks.evaluate_any``).

Usage: ``python -m tasks.register --arch tiny-llava --rate 0.9`` (``--rate any``)
"""

from __future__ import annotations

import json

import mc_registry
from tasks import cells, common, lineage, tracking

PARAMS = ("register", "train", "tracking")


def gate(
    metrics: dict,
    method: str,
    metric: str,
    baseline: str,
    champion: tuple[str, float | None] | None,
    *,
    champion_val_same: bool = True,
) -> dict:
    """Whether this cell's version may take the ``champion`` alias, decided on data/val.

    Args:
        metrics: the cell's eval report (its ``validation`` section, from tasks.evaluate).
        method: the trained method (``train.method``).
        metric: ``register.champion_metric`` (``acc_avg``: higher is better; else lower).
        baseline: ``register.gate_baseline``, which the version must beat.
        champion: the registry's current ``(version, score tag)`` at registration time.
        champion_val_same: False when the champion's score tag was measured on another
            data/val than this report's (its recorded data/val hash differs): then that tag is
            no bar to compare with.

    Returns:
        ``{"promote": bool, "reason": str, "score": float, "baseline": float,
        "champion": float | None, "champion_version": str | None}`` where ``score`` is the
        version's validation score (what its registry ``score`` tag records).

    Raises:
        ValueError: the report lacks the validation scores the gate needs (naming them).
    """
    val = metrics.get("validation", {}).get("methods", {})
    for name in (method, baseline):
        if metric not in val.get(name, {}):
            raise ValueError(
                f"validation.methods.{name}.{metric} missing from the eval report: "
                "the gate needs data/val evaluated (tasks.evaluate)"
            )
    better = (lambda a, b: a > b) if metric == "acc_avg" else (lambda a, b: a < b)
    score, base = float(val[method][metric]), float(val[baseline][metric])
    out = {
        "promote": False,
        "score": score,
        "baseline": base,
        "champion": None,
        "champion_version": champion[0] if champion else None,
    }
    if not better(score, base):
        return {
            **out,
            "reason": f"{method} {metric}={score:.4f} on data/val does not beat "
            f"{baseline} ({base:.4f})",
        }
    if champion is None:
        return {
            **out,
            "promote": True,
            "reason": f"beats {baseline} on data/val ({score:.4f} vs {base:.4f}); no champion yet",
        }
    seen = val.get("champion", {})
    if seen.get("version") == champion[0] and seen.get("same_checkpoint"):
        return {
            **out,
            "champion": score,
            "reason": f"this checkpoint already is champion v{champion[0]}",
        }
    if seen.get("version") == champion[0] and metric in seen:
        held, how = float(seen[metric]), "re-evaluated on data/val"
    elif champion[1] is not None and not champion_val_same:
        # A score on other validation dialogues (a resized or reseeded data/val) is no bar.
        return {
            **out,
            "reason": f"champion v{champion[0]}'s recorded score is from another data/val: not "
            "compared, alias kept (re-run evaluate to score it on this one)",
        }
    elif champion[1] is not None:  # the alias moved since evaluation: its recorded val score
        held, how = float(champion[1]), "its recorded score"
    else:
        return {**out, "reason": f"champion v{champion[0]} has no score to compare with"}
    out["champion"] = held
    if not better(score, held):
        return {
            **out,
            "reason": f"{method} {metric}={score:.4f} on data/val does not beat "
            f"champion v{champion[0]} ({held:.4f}, {how})",
        }
    return {
        **out,
        "promote": True,
        "reason": f"beats {baseline} ({base:.4f}) and champion v{champion[0]} "
        f"({held:.4f}, {how}) on data/val with {score:.4f}",
    }


def _decide(
    p,
    metrics: dict,
    name: str,
    base_sha: str,
    ckpt: str,
    val_hash: str | None,
    test_score: float,
    method: str,
) -> dict:
    """The gate's decision for this version (``promote`` None when ungated), with its reason."""
    metric = p.register.champion_metric
    if not (p.register.gate and "validation" in metrics):
        # No data/val (or gate off): the best test score holds the alias, as before.
        why = "register.gate is false" if not p.register.gate else "no data/val evaluation"
        return {
            "promote": None,
            "score": test_score,
            "reason": f"ungated ({why}): alias on the best-scored version",
        }
    # Only a champion of the same base model competes: one trained against other weights
    # (a retrained teacher, another checkpoint) was scored on a different model.
    # One alias lookup (the version comes with its tags) decides both: same base model,
    # same checkpoint.
    found = mc_registry.champion(name)
    held, tags = (found[:2], found[2]) if found is not None else (None, {})
    same = held if held is not None and tags.get("base_sha256") == base_sha else None
    was_val = tags.get(f"dvc.{common.DATA_VAL}")
    decision = gate(
        metrics,
        method,
        metric,
        p.register.gate_baseline,
        same,
        champion_val_same=not (val_hash and was_val and val_hash != was_val),
    )
    if same is not None and tags.get("ckpt_sha256") == ckpt:
        # A rerun after the alias moved to this very checkpoint (the eval report, written
        # before, saw the previous champion): nothing to decide.
        decision["reason"] = f"this checkpoint already is champion v{same[0]}"
    if held is not None and same is None:
        recorded = tags.get("base_sha256")
        why = "was trained against another base model" if recorded else "records no base model"
        decision["reason"] += f" (champion v{held[0]} {why}: not compared)"
    return decision


def _rate_tags(metrics: dict) -> dict[str, str]:
    """An any-rate version's trained rates (``rates``, ``rate_lo``, ``rate_hi``: what it
    serves) and the rate it runs at without one (``nominal_rate``); none for a cell's."""
    if "trained_rates" not in metrics:
        return {}
    lo, hi = metrics["span"]
    return {
        "rates": ",".join(cells.format_rate(r) for r in metrics["trained_rates"]),
        "rate_lo": cells.format_rate(lo),
        "rate_hi": cells.format_rate(hi),
        "nominal_rate": cells.format_rate(metrics["nominal_rate"]),
    }


def _model_meta(arch: str, ckpt: str, base_sha: str, hashes: dict, git: str) -> dict:
    """The lineage the version's MLflow model metadata carries (its tags record the same):
    the checkpoint's and the base model's content hashes, the base model's DVC hash."""
    return {
        "arch": arch,
        "ckpt_sha256": ckpt,
        "git_sha": git,
        "base_model": {
            "sha256": base_sha,
            "dvc_md5": hashes.get(f"dvc.{cells.base_dir(arch)}"),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Register (or find) the cell's version and move the champion alias if the gate allows."""
    p = common.load_params(PARAMS, who="tasks.register")
    arch, rate = common.cell_args(__doc__.splitlines()[0], argv, any_rate=True)
    rate_s = cells.format_rate(rate)
    # The report's key of the registered method (an any-rate compressor's: metacompress-any).
    method = cells.any_method(p.train.method) if rate == cells.ANY else p.train.method
    ckpt_dir = cells.compressor_dir(arch, rate)
    eval_file = cells.cell_file("eval", arch, rate)
    metrics = json.loads(eval_file.read_text())
    metric = p.register.champion_metric
    try:
        test_score = float(metrics["methods"][method][metric])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{eval_file}: no methods.{method}.{metric} to rank the version "
            f"by (register.champion_metric={metric!r})"
        ) from None
    name = p.register.model_name(arch, rate, p.train.method)
    base_sha = lineage.checkpoint_hash(cells.base_dir(arch))
    ckpt = lineage.checkpoint_hash(ckpt_dir)
    # The inputs' DVC hashes: lineage tags, and data/val's scopes which recorded score counts.
    hashes = lineage.dvc_hashes(
        [
            str(cells.base_dir(arch)),
            str(common.DATA_TRAIN),
            str(common.DATA_VAL),
            str(common.DATA_TEST),
            str(ckpt_dir),
        ]
    )
    val_hash = hashes.get(f"dvc.{common.DATA_VAL}")
    decision = _decide(p, metrics, name, base_sha, ckpt, val_hash, test_score, method)
    score, promote = decision["score"], decision["promote"]
    tags = {
        "arch": arch,
        "rate": rate_s,
        "git_sha": lineage.git_sha(),
        "experiment": p.tracking.experiment,
        "eval_dataset": metrics.get("dataset", "unknown"),
        "score_split": "val" if promote is not None else "test",
        "test_score": repr(test_score),
        "gate": decision["reason"],
        "base_sha256": base_sha,
        **hashes,
        **_rate_tags(metrics),
    }
    reg = tracking.register_checkpoint(
        name,
        ckpt_dir,
        run_id=tracking.cell_run_for(p.tracking.experiment, arch, rate_s, ckpt),
        score=score,
        metric=metric,
        higher_is_better=(metric == "acc_avg"),
        tags=tags,
        promote=promote,
        base_dir=cells.base_dir(arch),
        model_meta=_model_meta(arch, ckpt, base_sha, hashes, tags["git_sha"]),
    )
    out = common.write_json(
        cells.cell_file("registry", arch, rate),
        {
            **reg.to_dict(),
            # The alias URI only when a champion exists; a refused first version names none.
            "uri": mc_registry.model_uri(reg.name) if reg.champion else None,
            "version_uri": mc_registry.model_uri(reg.name, version=reg.version),
            "gate": decision,
        },
    )
    verb = "registered" if reg.created else "already registered"
    if reg.repackages:
        verb += f" (an MLflow model of the checkpoint of folder version(s) {reg.repackages})"
    print(
        f"register: {reg.name} v{reg.version} {verb}; champion v{reg.champion or '-'} "
        f"({decision['reason']}) -> {out}",
        flush=True,
    )


if __name__ == "__main__":
    with common.stage("register"):
        main()
