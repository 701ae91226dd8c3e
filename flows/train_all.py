"""Prefect flow ``train-all``: the DVC pipeline, orchestrated and fanned out.

DVC owns what is stale; this flow owns when and where. It reads the stage kinds, their fan-out
and their order from the workspace's ``dvc.yaml`` (``flows.dag``), runs the shared and per-arch
stages upstream of the cells first (``prepare``, then each ``base@<arch>`` in turn), then fans
the cells out through the task runner, each cell's per-cell stages chained in ``dvc.yaml``'s
order (``train@ -> evaluate@ -> register@``), and finally what reads the cells (``report``).
Every task is one ``dvc repro -s <stage>``: DVC skips what is up to date, so re-running the
flow is cheap. Lock conflicts between concurrent ``dvc repro`` calls are retried; nothing is
cached by Prefect (DVC decides staleness). The MLflow schema is migrated once before the fan-out.
At the end the run page gets the summary table and each cell's registry decision as Prefect
artifacts (``flows.artifacts``); failing to publish them is logged and never fails the flow.

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
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

import mc_registry
from flows import artifacts, dag
from flows import workspace as ws
from tasks import params
from tasks.cells import ANY, cell_key, report_dir, report_file, split_stage, stage_name

MAX_PARALLEL = int(os.environ.get("MC_MAX_PARALLEL", "2"))
LOCK_RETRIES = 6
REGISTRY = str(report_dir("registry"))  # the registry stage's records, one JSON per cell
SUMMARY = Path("reports") / "summary.md"  # the report stage's table


def _retry_on_lock(task, task_run, state) -> bool:
    """Retry only DVC lock conflicts; a failing stage fails at once."""
    try:
        state.result()
    except ws.DvcLockError:
        return True
    except Exception:
        return False
    return False


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=LOCK_RETRIES,
    retry_delay_seconds=[1, 2, 4, 8, 15, 30],
    retry_condition_fn=_retry_on_lock,
)
def run_stage(stage: str, workspace: str, checkout: str, force: bool = False) -> str:
    """``dvc repro -s <stage>`` in ``workspace``; returns the last lines of its output.

    The environment (venv on PATH, MLflow at the checkout's store) is built here rather than
    passed in, so no environment variable ends up in Prefect's task parameters.
    """
    out = ws.repro_stage(stage, Path(workspace), env=ws.tracking_env(Path(checkout)), force=force)
    tail = "\n".join(out.strip().splitlines()[-8:])
    get_run_logger().info("%s:\n%s", stage, tail)
    return tail


def registered(workspace: str, key: str, uri: str | None = None) -> bool:
    """Whether the version recorded in ``reports/registry/<key>.json`` is in the store."""
    f = Path(workspace) / report_file("registry", key)
    if not f.is_file():
        return False
    rec = json.loads(f.read_text())
    if not {"name", "version", "ckpt_sha256"} <= set(rec):
        return True  # not a registry record (stand-in stages): nothing to verify
    try:
        tags = mc_registry.version_tags(rec["name"], rec["version"], uri=uri)
    except Exception:  # no such model or version in this store
        return False
    return tags.get("ckpt_sha256") == rec.get("ckpt_sha256")


@task(name="mlflow-migrate", cache_policy=NO_CACHE, persist_result=False)
def migrate_tracking(uri: str) -> str:
    """Create the MLflow schema once, before cells write to it concurrently."""
    return mc_registry.migrate(uri)


@task(name="publish-artifacts", cache_policy=NO_CACHE, persist_result=False)
def publish_artifacts(
    workspace: str, checkout: str, registry: dict[str, dict | None], summary: bool
) -> list[str]:
    """The run page's artifacts: the summary table (when the report ran) and the cells' registry
    decisions, linked to MLflow where it is a server; returns the keys published.

    The tracking URI is looked up here, not passed in, so it stays out of the task's parameters.
    """
    text = (Path(workspace) / SUMMARY).read_text() if summary else None
    uri = mc_registry.tracking_uri(checkout)
    return artifacts.publish(registry, uri, summary=text, where=workspace, logger=get_run_logger())


@flow(name="train-all", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL), log_prints=True)
def train_all(
    profile: Literal["default", "smoke", "full"] = "default",
    archs: list[str] | None = None,
    rates: list[float] | None = None,
    checkout: str | None = None,
) -> dict:
    """Run the pipeline of ``profile`` (all cells, or the ``archs`` x ``rates`` subset).

    Args:
        profile: ``default`` (params.yaml in the checkout), ``smoke`` or ``full`` (each in
            ``runs/<profile>/``).
        archs: run only these archs' cells (each must be in the profile's grid).
        rates: run only these rates' cells (each must be in the profile's grid).
        checkout: the project root (default: this file's checkout).

    Returns:
        ``{"workspace", "stages": [...], "registry": {cell: registry record}}``; shared stages
        downstream of the cells (the report) run only when every cell of the grid was selected.
    """
    logger = get_run_logger()
    root = Path(checkout or ws.CHECKOUT).resolve()
    # Params are validated here, before any stage starts: a bad key fails the flow at once.
    workspace = ws.ensure(profile, root)
    p = params.load(workspace / params.DEFAULT_PATH)
    assert isinstance(p, params.Params)
    doc = dag.load(workspace / "dvc.yaml")
    kinds = dag.kinds_of(doc)
    names = ws.by_kind(ws.stages(workspace))
    all_cells = ws.cell_keys(names, kinds)
    cells = ws.select_cells(all_cells, p.grid, archs, rates)
    chosen = {a for a in p.grid.archs for k in cells if k.startswith(f"{a}-")}
    logger.info("workspace %s: %d cells %s", workspace, len(cells), cells)
    run = _Runner(str(workspace), str(root))

    migrate_tracking(ws.tracking_env(root)["MLFLOW_TRACKING_URI"])  # before any fan-out
    later = dag.downstream_of_cells(kinds)
    for kind in kinds:  # shared and per-arch stages upstream of the cells, in order
        if kind.fanout != "cell" and kind.name not in later:
            run.serial(kind, names, chosen)
    run.cells([k for k in kinds if k.fanout == "cell"], cells)

    # The registry lives outside DVC: if the tracking store was reset since a cell's register
    # stage ran, DVC would skip it; re-run those (registration is idempotent by content hash).
    # The per-arch registrars (register-any@<arch>: the any-rate compressors) likewise.
    fanout = {k.name: k.fanout for k in kinds}
    uri = ws.tracking_env(root)["MLFLOW_TRACKING_URI"]
    any_keys = {a: cell_key(a, ANY) for a in p.grid.any_rate_archs if a in chosen}
    for registrar in dag.writers_of(doc, REGISTRY):
        if fanout[registrar] == "cell":
            stale = [k for k in cells if not registered(str(workspace), k, uri)]
            run.again([stage_name(registrar, k) for k in stale])
        elif fanout[registrar] == "arch":
            stale = [a for a, k in any_keys.items() if not registered(str(workspace), k, uri)]
            run.again([stage_name(registrar, a) for a in stale])

    for kind in kinds:  # what reads the cells' outputs (the report)
        if kind.name not in later:
            continue
        if kind.fanout == "shared" and len(cells) != len(all_cells):
            logger.info(
                "%s skipped: only %d of %d cells selected", kind.name, len(cells), len(all_cells)
            )
            continue
        run.serial(kind, names, chosen)
    registry = {}
    for key in [*cells, *any_keys.values()]:
        f = workspace / report_file("registry", key)
        registry[key] = json.loads(f.read_text()) if f.is_file() else None
    summary = workspace / SUMMARY
    reported = summary.is_file() and bool(later & set(run.ran))  # the report ran: show its table
    if reported:
        print(summary.read_text())
    # Views of the files on the run page: a failure to publish them never fails the pipeline.
    state = publish_artifacts(str(workspace), str(root), registry, reported, return_state=True)
    if not state.is_completed():
        logger.warning("run page artifacts not published: %s", state.message)
    return {"workspace": str(workspace), "stages": run.ran, "registry": registry}


class _Runner:
    """Submits ``dvc repro -s`` tasks for one workspace and records what ran, in order."""

    def __init__(self, workspace: str, root: str):
        self.workspace, self.root = workspace, root
        self.ran: list[str] = []

    def serial(self, kind: dag.Kind, names: dict[str, list[str]], archs: set[str]) -> None:
        """A shared stage, or each chosen arch's stage one at a time: base models train on
        shared cores, where two at once would each run at half speed."""
        for stage in names.get(kind.name, []):
            key = split_stage(stage)[1]
            if kind.fanout == "shared" or key in archs:
                run_stage(stage, self.workspace, self.root)
                self.ran.append(stage)

    def cells(self, cell_kinds: list[dag.Kind], keys: list[str]) -> None:
        """Every cell's chain of per-cell stages, cells in parallel; raise the first failure."""
        futures = []
        for key in keys:
            mine: dict[str, Any] = {}
            for kind in cell_kinds:  # in order: what a stage waits for is already submitted
                stage = stage_name(kind.name, key)
                waits = [mine[a] for a in kind.after if a in mine]
                mine[kind.name] = run_stage.submit(stage, self.workspace, self.root, wait_for=waits)
                self.ran.append(stage)
            futures += list(mine.values())
        for f in futures:
            f.wait()  # let every independent cell finish before reporting a failure
        for f in futures:
            # Stages downstream of a failure never run (they stay pending): raise the root cause.
            if f.state.is_failed() or f.state.is_crashed():
                f.result()

    def again(self, stages: list[str]) -> None:
        """Force-run ``stages`` in parallel (``dvc repro -s -f``)."""
        for f in [run_stage.submit(s, self.workspace, self.root, force=True) for s in stages]:
            f.result()
        self.ran += [s for s in stages if s not in self.ran]


def _dask_runner():
    from prefect_dask import DaskTaskRunner

    address = os.environ.get("MC_DASK_ADDRESS")
    if address:  # an existing cluster (e.g. dask workers on GPU hosts sharing the checkout)
        return DaskTaskRunner(address=address)
    # Tasks only wait on `dvc repro` subprocesses: threads in one worker process suffice.
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": 1,
            "threads_per_worker": MAX_PARALLEL,
            "processes": False,
            "dashboard_address": None,
        },
    )


train_all_dask = train_all.with_options(task_runner=_dask_runner())


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.train_all [--profile P] [--archs A ...] [--rates R ...] [--dask]``."""
    ap = argparse.ArgumentParser(description="run the train-all flow once, in this process")
    ap.add_argument("--profile", default="default", choices=sorted(params.PROFILES))
    ap.add_argument("--archs", nargs="*")
    ap.add_argument("--rates", nargs="*", type=float)
    ap.add_argument("--dask", action="store_true", help="use the Dask task runner")
    a = ap.parse_args(argv)
    fn = train_all_dask if a.dask else train_all
    result = fn(profile=a.profile, archs=a.archs or None, rates=a.rates or None)
    print(json.dumps(result["registry"], indent=1))


if __name__ == "__main__":
    main()
