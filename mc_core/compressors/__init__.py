"""Visual-token compressors: one file per method, one registry, one call contract.

``build(name, rate=..., dim=...)`` returns a module whose call on tokens [n, d] returns
``(Y [m, d], P [m, n])`` with ``m = ceil((1 - rate) n)`` and ``Y = P @ tokens``; a list of
tensors (one per image) returns lists.
"""

from __future__ import annotations

from mc_core.compressors.base import Compressor, TokenContext
from mc_core.compressors.divprune import DivPruneCompressor
from mc_core.compressors.fastv import FastVCompressor
from mc_core.compressors.metacompress import MetaCompress
from mc_core.compressors.none import NoneCompressor
from mc_core.compressors.pool import PoolCompressor
from mc_core.compressors.prumerge import PruMergeCompressor
from mc_core.compressors.random_ import RandomCompressor
from mc_core.compressors.sample import SampleCompressor
from mc_core.compressors.tome import ToMeCompressor
from mc_core.compressors.visionzip import VisionZipCompressor

__all__ = ["Compressor", "TokenContext", "available", "build", "get_class"]

_REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (
        NoneCompressor,
        RandomCompressor,
        SampleCompressor,
        PoolCompressor,
        PruMergeCompressor,
        VisionZipCompressor,
        DivPruneCompressor,
        ToMeCompressor,
        FastVCompressor,
        MetaCompress,
    )
}


def available() -> list[str]:
    """Registered method names, in the project's canonical order."""
    return list(_REGISTRY)


def get_class(name: str) -> type[Compressor]:
    """The class registered as ``name`` (to read ``needs`` etc. without building).

    Raises:
        ValueError: Unknown name, listing the available ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, *, rate: float, dim: int, **cfg) -> Compressor:
    """Build the compressor ``name`` for a reduction ``rate`` on tokens of width ``dim``.

    Raises:
        ValueError: Unknown name, bad rate or dim, or a keyword the method does not take.
    """
    cls = get_class(name)
    try:
        return cls(rate=rate, dim=dim, **cfg)
    except TypeError as err:
        raise ValueError(f"bad config for compressor {name!r}: {err}") from None
