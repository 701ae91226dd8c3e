"""Profiles: named overlays on the committed ``params.yaml`` (which *is* the ``default`` profile).

``smoke`` (a tiny grid, a few steps; the whole DAG in minutes) and ``full`` (every tiny base
model, three seeds per cell). :func:`profile_params` applies one; the pipeline runs non-default
profiles in their own workspace (see ``flows/workspace.py``) so the default outputs are never
overwritten.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from mc_core import io
from tasks.params.document import validate

__all__ = ["PROFILES", "ProfileName", "dump_yaml", "profile_params"]

# Profiles: overlays on the committed params.yaml (= "default"). Nested dicts merge; lists and
# scalars replace. Smoke keeps every stage of the DAG but shrinks each to seconds.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    # The whole DAG in a few minutes, with numbers that mean something: the base section keeps
    # the default recipe, so the committed teacher is reused (flows/workspace.py copies it into
    # the smoke workspace; its recipe_sha matches), and the compressors train 120 steps of the
    # default recipe on 144 dialogues, enough to leave `sample` behind (docs/pipeline.md,
    # "Profiles", has the measured numbers); val and test hold 60 dialogues each.
    "smoke": {
        # One any-rate compressor, met at one probe rate.
        "grid": {
            "archs": ["tiny-llava"],
            "rates": [0.5, 0.9],
            "any_rate_archs": ["tiny-llava"],
            "probe_rates": [0.75],
        },
        "data": {"train": {"dialogues": 144}, "val": {"dialogues": 60}, "test": {"dialogues": 60}},
        "train": {"max_steps": 120, "log_every": 10},
        "evaluate": {
            "methods": ["none", "sample", "metacompress"],
            "max_dialogues": 60,
            "ceilings": {"enabled": False},
        },
        "report": {"methods": ["none", "sample", "metacompress"]},
        "tracking": {"experiment": "metacompress-smoke"},
        # Its own registered models: a smoke compressor (120 steps, 60 val dialogues) must
        # never take the alias of the default pipeline's cell, whose name it would share.
        "register": {
            "name_template": "metacompress-smoke-{arch}-r{rate}",
            "any_name_template": "metacompress-smoke-{arch}-any",
        },
    },
    "full": {
        "grid": {"archs": ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]},
        # Three seeds per cell: the summary reports the trained method's mean +- sd.
        "train": {"seeds": 3},
    },
}
ProfileName = Literal["default", "smoke", "full"]


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_params(
    name: str, base: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The params of profile ``name``: its overlay (then ``extra``) merged onto ``base``.

    ``base`` is normally the parsed ``params.yaml`` (so a smoke run inherits your real-model or
    real-data settings and only shrinks the work). Profiles live here, not in ``params.yaml``,
    so DVC sees one flat params file per workspace. The result is validated.
    """
    if name not in PROFILES:
        raise ValueError(f"profile={name!r}: unknown profile; known: {', '.join(PROFILES)}")
    merged = _merge(dict(base), PROFILES[name])
    if extra:
        merged = _merge(merged, extra)
    validate(merged, source=f"profile {name!r}")
    return merged


def dump_yaml(params: Mapping[str, Any], path: str | Path, *, header: str = "") -> Path:
    """Write a params mapping as YAML atomically."""
    text = yaml.safe_dump(dict(params), sort_keys=False, default_flow_style=False)
    return io.write_text(path, header + text)
