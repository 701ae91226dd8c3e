"""The pipeline's ``params.yaml``: one typed model per section, validated before any compute.

``params.yaml`` is the single source of every hyper-parameter and of the grid of cells
(architecture x reduction rate). DVC tracks its keys; the stage entry points read it only
through :func:`load`, which validates the whole file first, so a bad value stops every stage
before it touches a model and the error names the key, e.g.::

    params.yaml: grid.rates[1]=1.5: rate must be in (0, 1) (the fraction of tokens removed), ...

Sections: ``grid`` (the cells), ``models`` (where real base models come from: a name per HF id
or local folder, so ``grid.archs`` holds only filesystem-safe names), ``data`` (what
``tasks.prepare`` builds), ``world`` (``mc_core.data.synthetic.WorldConfig``), ``base``
(``mc_core.training.teacher.TeacherConfig``), ``train`` (``mc_core.training.config.TrainConfig``),
``evaluate``, ``register``, ``tracking`` and ``report``. The library's own configs are used as
they are; the pipeline-only sections live here.

Modules, one job each:

- ``archs``: which archs exist (``known_archs``), safe names (``SAFE_NAME``, ``slug``), where a
  real arch comes from (``ModelSource``, ``source_of``);
- ``sections``: the pipeline-only sections (``GridParams``, ``DataParams``, ``EvaluateParams``,
  ``RegisterParams``, ...);
- ``overrides`` and ``recipes``: ``base`` and ``train``, the library configs with their per-arch
  / per-cell overrides (one mechanism for both);
- ``document``: the whole file (``Params``, ``validate``, ``read_yaml``, ``load``,
  ``SectionView``) and ``python -m tasks.params [path]``, which validates a params file and
  prints its cells;
- ``profiles``: the ``smoke`` and ``full`` overlays (``PROFILES``, ``profile_params``).

How a cell is named (``cell_key``, ``format_rate``) and the rate check (``check_rate``) are
``tasks.cells``'s; they are re-exported here for callers of the former single module.
"""

from __future__ import annotations

from tasks.cells import cell_key, check_rate, format_rate
from tasks.params.archs import (
    MODEL_NAMES,
    SAFE_NAME,
    ModelSource,
    check_arch,
    known_archs,
    slug,
    slugs,
    source_of,
)
from tasks.params.document import (
    DEFAULT_PATH,
    SECTIONS,
    Params,
    SectionView,
    load,
    main,
    read_yaml,
    validate,
)
from tasks.params.profiles import PROFILES, ProfileName, dump_yaml, profile_params
from tasks.params.profiles import _merge as _merge  # reliability/workspace.py overlays with it
from tasks.params.recipes import BaseParams, TrainParams
from tasks.params.sections import (
    CeilingsParams,
    DataParams,
    EvaluateParams,
    GridParams,
    RegisterParams,
    ReportParams,
    SplitParams,
    TrackingParams,
)

__all__ = [
    "DEFAULT_PATH",
    "MODEL_NAMES",
    "PROFILES",
    "SAFE_NAME",
    "SECTIONS",
    "BaseParams",
    "CeilingsParams",
    "DataParams",
    "EvaluateParams",
    "GridParams",
    "ModelSource",
    "Params",
    "ProfileName",
    "RegisterParams",
    "ReportParams",
    "SectionView",
    "SplitParams",
    "TrackingParams",
    "TrainParams",
    "cell_key",
    "check_arch",
    "check_rate",
    "dump_yaml",
    "format_rate",
    "known_archs",
    "load",
    "main",
    "profile_params",
    "read_yaml",
    "slug",
    "slugs",
    "source_of",
    "validate",
]
