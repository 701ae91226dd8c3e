"""Visual-token compressors: one file per method, one registry, one call contract.

``build(name, rate=..., dim=...)`` returns a module whose call on tokens [n, d] returns
``(Y [m, d], P [m, n])`` with ``m = ceil((1 - rate) n)`` and ``Y = P @ tokens``; a list of
tensors (one per image) returns lists.

Each method registers itself with ``@register("<name>")`` on its class (see ``register``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from mc_core.compressors.base import Compressor, TokenContext

__all__ = [
    "Compressor",
    "TokenContext",
    "available",
    "build",
    "get_class",
    "prompt_agnostic",
    "register",
    "trained_method",
]

_REGISTRY: dict[str, type[Compressor]] = {}
# Modules of this package that are not methods: the contract, P algebra, checkpoint files.
_SHARED = frozenset({"base", "ops", "checkpoint"})


def register(name: str):
    """Class decorator: make a ``Compressor`` subclass buildable as ``name``.

    Sets the class's ``name``; a second class under the same name is an error (two files
    claiming one method would silently shadow each other).
    """

    def deco(cls: type[Compressor]) -> type[Compressor]:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(f"@register({name!r}) expects a Compressor subclass, got {cls!r}")
        other = _REGISTRY.get(name)
        if other is not None and other is not cls:
            raise ValueError(
                f"compressor {name!r} is registered twice: {other.__module__}."
                f"{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load() -> None:
    # Every module of the package is a method file, but for the shared machinery (_SHARED):
    # importing them runs their @register decorators, so a new method is one new file.
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    """Registered method names: ``none``, the other fixed methods, then the trainable ones."""
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].trainable, n != "none", n))


def prompt_agnostic(names: Iterable[str]) -> list[str]:
    """The prompt-agnostic heuristics among ``names``, in order: registered methods that are
    neither the full model (``none``), nor trained, nor prompt-dependent (FastV, CDPruner keep
    what the first prompt asked for); other names are skipped."""
    return [
        m
        for m in names
        if m in _REGISTRY
        and m != "none"
        and not _REGISTRY[m].trainable
        and not _REGISTRY[m].prompt_dependent
    ]


def trained_method(names: Iterable[str]) -> str | None:
    """The first trainable registered method among ``names`` (None: there is none)."""
    return next((m for m in names if m in _REGISTRY and _REGISTRY[m].trainable), None)


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


_load()
