"""What the MLflow store of a workspace holds, compared with the reference's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reliability import workspace as W


@dataclass
class RegistryCheck:
    """``ok``: same versions and champions as the reference; ``lost``: a version or run gone
    or duplicated; ``how``: one line."""

    ok: bool
    lost: bool
    how: str


def tracking_client(ws: Path):
    """An MLflow client on the workspace's store."""
    import mc_registry

    return mc_registry.client(f"sqlite:///{ws / 'mlflow.db'}")


def unregister(ws: Path) -> None:
    """Make the workspace's cell unregistered (its registered model and registry record
    removed), so that a register stage run in it registers for real."""
    tracking_client(ws).delete_registered_model(f"metacompress-{W.ARCH}-r0.5")
    (ws / "reports" / "registry" / f"{W.CELL}.json").unlink()


def state(ws: Path) -> dict[str, dict]:
    """Per registered model: its versions' checkpoint hashes and the champion's version."""
    from mlflow.exceptions import MlflowException

    import mc_registry

    c = mc_registry.client(f"sqlite:///{ws / 'mlflow.db'}")
    out = {}
    for m in c.search_registered_models():
        versions = c.search_model_versions(f"name = '{m.name}'")
        try:
            champ = c.get_model_version_by_alias(m.name, mc_registry.CHAMPION).version
        except MlflowException:
            champ = None
        out[m.name] = {
            "versions": sorted((int(v.version), v.tags.get("ckpt_sha256", "")) for v in versions),
            "champion": champ,
        }
    return out


def finished_runs(ws: Path) -> int:
    """Training runs that ended FINISHED in the workspace's store."""
    import mc_registry

    c = mc_registry.client(f"sqlite:///{ws / 'mlflow.db'}")
    exps = [e.experiment_id for e in c.search_experiments()]
    return (
        len(c.search_runs(exps, filter_string="attributes.status = 'FINISHED'", max_results=1000))
        if exps
        else 0
    )


def check_registry(ws: Path, ref: Path) -> RegistryCheck:
    """Compare the registry of ``ws`` with the reference's (same versions, same champion)."""
    got, want = state(ws), state(ref)
    if got == want:
        n = sum(len(m["versions"]) for m in got.values())
        return RegistryCheck(
            True,
            False,
            f"registry as the reference ({n} versions, "
            f"champions {[m['champion'] for m in got.values()]})",
        )
    lost = any(
        len(got.get(k, {}).get("versions", [])) != len(v["versions"]) for k, v in want.items()
    )
    return RegistryCheck(False, lost, f"registry DIFFERS: {got} vs reference {want}")
