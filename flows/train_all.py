"""Prefect flow ``train-all``: the DVC pipeline, orchestrated and fanned out.

DVC owns what is stale; this flow owns when and where. It asks DVC for the stages of the
profile's workspace (``flows.workspace``), runs the shared upstream stages first (``prepare``,
then each ``base@<arch>`` in turn), then fans the cells out through the task runner, each cell's
``train@ -> evaluate@ -> register@`` chained, and finally ``report``. Every task is one
``dvc repro -s <stage>``: DVC skips what is up to date, so re-running the flow is cheap.
Lock conflicts between concurrent ``dvc repro`` calls are retried; nothing is cached by Prefect
(DVC decides staleness). The MLflow schema is migrated once before the fan-out.

Task runners: ``train_all`` uses a thread pool (``MC_MAX_PARALLEL`` workers, default 2);
``train_all_dask`` the same flow on Dask (``prefect-dask``): a ``LocalCluster`` by default, or
the scheduler at ``MC_DASK_ADDRESS`` (workers on GPU hosts sharing the workspace).

Run: ``prefect deployment run train-all/train-all -p profile=smoke --watch`` (after
``make serve``), or directly ``python -m flows.train_all --profile smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import workspace as ws
from mc_core import config

MAX_PARALLEL = int(os.environ.get("MC_MAX_PARALLEL", "2"))
LOCK_RETRIES = 6


def _retry_on_lock(task, task_run, state) -> bool:
    """Retry only DVC lock conflicts; a failing stage fails at once."""
    try:
        state.result()
    except ws.DvcLockError:
        return True
    except Exception:
        return False
    return False


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False,
      retries=LOCK_RETRIES, retry_delay_seconds=[1, 2, 4, 8, 15, 30],
      retry_condition_fn=_retry_on_lock)
def run_stage(stage: str, workspace: str, checkout: str, force: bool = False) -> str:
    """``dvc repro -s <stage>`` in ``workspace``; returns the last lines of its output.

    The environment (venv on PATH, MLflow at the checkout's store) is built here rather than
    passed in, so no environment variable ends up in Prefect's task parameters.
    """
    out = ws.repro_stage(stage, Path(workspace), env=ws.tracking_env(Path(checkout)),
                         force=force)
    tail = "\n".join(out.strip().splitlines()[-8:])
    get_run_logger().info("%s:\n%s", stage, tail)
    return tail


def registered(workspace: str, key: str, uri: str | None = None) -> bool:
    """Whether the version recorded in ``reports/registry/<key>.json`` is in the store."""
    from tasks import tracking

    f = Path(workspace) / "reports" / "registry" / f"{key}.json"
    if not f.is_file():
        return False
    rec = json.loads(f.read_text())
    if not {"name", "version", "ckpt_sha256"} <= set(rec):
        return True  # not a registry record (stand-in stages): nothing to verify
    try:
        mv = tracking.client(uri).get_model_version(rec["name"], rec["version"])
    except Exception:  # no such model or version in this store
        return False
    return mv.tags.get("ckpt_sha256") == rec.get("ckpt_sha256")


@task(name="mlflow-migrate", cache_policy=NO_CACHE, persist_result=False)
def migrate_tracking(uri: str) -> str:
    """Create the MLflow schema once, before cells write to it concurrently."""
    from tasks import tracking

    return tracking.migrate(uri)


@flow(name="train-all", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL),
      log_prints=True)
def train_all(profile: Literal["default", "smoke", "full"] = "default",
              archs: list[str] | None = None, rates: list[float] | None = None,
              checkout: str | None = None) -> dict:
    """Run the pipeline of ``profile`` (all cells, or the ``archs`` x ``rates`` subset).

    Args:
        profile: ``default`` (params.yaml in the checkout), ``smoke`` or ``full`` (each in
            ``runs/<profile>/``).
        archs: run only these archs' cells (each must be in the profile's grid).
        rates: run only these rates' cells (each must be in the profile's grid).
        checkout: the project root (default: this file's checkout).

    Returns:
        ``{"workspace", "stages": [...], "registry": {cell: registry record}}``; the ``report``
        stage runs only when every cell of the grid was selected.
    """
    logger = get_run_logger()
    root = Path(checkout or ws.CHECKOUT).resolve()
    # Params are validated here, before any stage starts: a bad key fails the flow at once.
    workspace = ws.ensure(profile, root)
    params = config.load(workspace / config.DEFAULT_PATH)
    assert isinstance(params, config.Params)
    groups = ws.split_stages(ws.stages(workspace))
    cells = ws.select_cells(groups["cells"], params.grid, archs, rates)
    chosen_archs = {a for a in params.grid.archs for k in cells if k.startswith(f"{a}-")}
    logger.info("workspace %s: %d cells %s", workspace, len(cells), cells)

    migrate_tracking(ws.tracking_env(root)["MLFLOW_TRACKING_URI"])  # before any fan-out
    ran: list[str] = []
    for stage in groups["shared_first"]:
        run_stage(stage, str(workspace), str(root))
        ran.append(stage)
    # Base models one at a time: teacher training runs on wall-clock budgets
    # (base.stage*_seconds), so two at once on shared cores would each get half the steps.
    bases = [s for s in groups["base"] if s.partition("@")[2] in chosen_archs]
    for stage in bases:
        run_stage(stage, str(workspace), str(root))
    ran += bases

    futures = []
    for key in cells:
        t = run_stage.submit(f"train@{key}", str(workspace), str(root))
        e = run_stage.submit(f"evaluate@{key}", str(workspace), str(root), wait_for=[t])
        r = run_stage.submit(f"register@{key}", str(workspace), str(root), wait_for=[e])
        futures += [t, e, r]
        ran += [f"train@{key}", f"evaluate@{key}", f"register@{key}"]
    for f in futures:
        f.wait()  # let every independent cell finish before reporting a failure
    for f in futures:
        # Stages downstream of a failure never run (they stay pending): raise the root cause.
        if f.state.is_failed() or f.state.is_crashed():
            f.result()

    # The registry lives outside DVC: if the tracking store was reset since a cell's register
    # stage ran, DVC would skip it; re-run those (registration is idempotent by content hash).
    uri = ws.tracking_env(root)["MLFLOW_TRACKING_URI"]
    stale = [k for k in cells if not registered(str(workspace), k, uri)]
    for f in [run_stage.submit(f"register@{k}", str(workspace), str(root), force=True)
              for k in stale]:
        f.result()
    ran += [f"register@{k}" for k in stale if f"register@{k}" not in ran]

    if len(cells) == len(groups["cells"]):
        for stage in groups["report"]:
            run_stage(stage, str(workspace), str(root))
            ran.append(stage)
    else:
        logger.info("report skipped: only %d of %d cells selected", len(cells),
                    len(groups["cells"]))
    registry = {}
    for key in cells:
        f = workspace / "reports" / "registry" / f"{key}.json"
        registry[key] = json.loads(f.read_text()) if f.is_file() else None
    summary = workspace / "reports" / "summary.md"
    if summary.is_file() and "report" in ran:
        print(summary.read_text())
    return {"workspace": str(workspace), "stages": ran, "registry": registry}


def _dask_runner():
    from prefect_dask import DaskTaskRunner

    address = os.environ.get("MC_DASK_ADDRESS")
    if address:  # an existing cluster (e.g. dask workers on GPU hosts sharing the checkout)
        return DaskTaskRunner(address=address)
    # Tasks only wait on `dvc repro` subprocesses: threads in one worker process suffice.
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": 1, "threads_per_worker": MAX_PARALLEL,
                                          "processes": False, "dashboard_address": None})


train_all_dask = train_all.with_options(task_runner=_dask_runner())


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.train_all [--profile P] [--archs A ...] [--rates R ...] [--dask]``."""
    ap = argparse.ArgumentParser(description="run the train-all flow once, in this process")
    ap.add_argument("--profile", default="default", choices=sorted(config.PROFILES))
    ap.add_argument("--archs", nargs="*")
    ap.add_argument("--rates", nargs="*", type=float)
    ap.add_argument("--dask", action="store_true", help="use the Dask task runner")
    a = ap.parse_args(argv)
    fn = train_all_dask if a.dask else train_all
    result = fn(profile=a.profile, archs=a.archs or None, rates=a.rates or None)
    print(json.dumps(result["registry"], indent=1))


if __name__ == "__main__":
    main()
