"""Per-arch and per-cell overrides of a recipe section: one mechanism for ``base`` and ``train``.

One shared recipe does not always serve every arch or cell (a 7-token Qwen cell at rate 0.9 is
not a 128-token LLaVA cell at 0.5). A recipe section is its library config (the shared recipe)
plus a mapping from an override key to a subset of that section's keys::

    base:                                      train:
      stage2_steps: 700                          lr: 0.02
      arch_overrides:                            overrides:
        tiny-qwen2-vl: {stage2_steps: 6000}        tiny-qwen2-vl: {epochs: 40}
                                                   "tiny-qwen2-vl@0.9": {lr: 0.01}

The recipe of an arch (``base``, whose stage runs per arch) or of a cell (``train``, per cell)
is the shared one, then its arch's override (key ``<arch>``), then its cell's (key
``<arch>@<rate>``, :func:`tasks.cells.override_key`). Every override is validated before any
compute, by the same rules in both sections: the key names a known arch (and a rate in (0, 1)
where the section is per cell), its keys are the section's recipe keys, and the merged recipe
validates as a whole. Keys need not be in the current grid (a smoke grid keeps the default
grid's overrides). The field keeps its params.yaml name in each section (``base.arch_overrides``,
``train.overrides``): dvc.lock records the sections as written. Overrides come with the sweep
that justifies them (docs/method.md, "Recipe sweeps").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tasks import cells
from tasks.params.archs import MODEL_NAMES, known_archs

__all__ = ["Overrides", "applied", "check", "recipe_for", "shared"]


@dataclass(frozen=True)
class Overrides:
    """How one section carries its overrides.

    Attributes:
        section: the params.yaml section (``base``, ``train``), for messages.
        field: the section's key holding the overrides.
        build: the library config from a merged mapping (raising ValueError naming the key).
        keys: the section's recipe keys, which an override may change.
        per_cell: whether ``<arch>@<rate>`` keys are allowed (the section's stage runs per cell).
        pipeline_keys: keys of the section that are not part of the recipe (``train.seeds``).
    """

    section: str
    field: str
    build: Callable[[dict[str, Any]], Any]
    keys: frozenset[str]
    per_cell: bool
    pipeline_keys: frozenset[str] = frozenset()

    def parse(self, key: str) -> tuple[str, float | None]:
        """The (arch, rate or None) of an override key of this section."""
        arch, rate = cells.parse_override_key(key)
        if rate is not None and not self.per_cell:
            raise ValueError(f"{key!r}: {self.section} is per arch: expected '<arch>'")
        return arch, rate


def shared(params: Any, spec: Overrides) -> dict[str, Any]:
    """The shared recipe of a section (every key but its overrides and pipeline keys)."""
    return params.model_dump(exclude={spec.field, *spec.pipeline_keys})


def check(params: Any, spec: Overrides) -> None:
    """Validate every override of a section; ValueError naming ``<field>.<key>``."""
    overrides: Mapping[str, Any] = getattr(params, spec.field)
    base = shared(params, spec)
    known = None
    for key, change in overrides.items():
        where = f"{spec.field}.{key}"
        try:
            arch, _ = spec.parse(key)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        known = known if known is not None else known_archs(MODEL_NAMES.get())
        if arch not in known:
            raise ValueError(f"{where}: unknown arch {arch!r}; known: {', '.join(known)}")
        if not isinstance(change, Mapping) or not change:
            raise ValueError(f"{where}: expected a non-empty mapping of {spec.section} keys")
        unknown = sorted(set(change) - spec.keys)
        if unknown:
            raise ValueError(
                f"{where}: {unknown} are not {spec.section} keys (known: {sorted(spec.keys)})"
            )
        try:
            spec.build({**base, **change})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def recipe_for(params: Any, spec: Overrides, arch: str, rate: float | None = None) -> Any:
    """The recipe of an arch (``rate`` None) or a cell: shared, then ``<arch>``, then
    ``<arch>@<rate>``; a plain library config (no overrides left in it)."""
    overrides: Mapping[str, Mapping[str, Any]] = getattr(params, spec.field)
    merged = shared(params, spec)
    merged.update(overrides.get(arch, {}))
    if rate is not None:
        for key, change in overrides.items():
            a, r = spec.parse(key)
            if a == arch and r is not None and abs(r - float(rate)) < 1e-9:
                merged.update(change)
    return spec.build(merged)


def applied(params: Any, spec: Overrides, arch: str, rate: float | None = None) -> dict[str, Any]:
    """What the overrides change for this arch or cell (empty: the shared recipe), for logs."""
    base = shared(params, spec)
    recipe = recipe_for(params, spec, arch, rate).model_dump(exclude={spec.field})
    return {k: v for k, v in recipe.items() if base.get(k) != v}
