"""LVLM family descriptors: one module per family, found and registered on first use.

    from mc_core.models import families
    families.available()                  # ['llava', 'llava_next', ...]
    fam = families.get("llava")           # the descriptor (a `Family`)
    families.for_model(model)             # the family of a model instance
    families.adapter_for(model)           # its adapter (the family's Adapter subclass)
    families.for_config(config_or_path)   # of a HF config, a config.json dict or a checkpoint

Adding a family means adding `mc_core/models/families/<name>.py` with a `Family` subclass decorated
with `@register` (and its tests): every module of this package except `base` is imported the
first time the registry is read, so nothing else lists the families.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path

from mc_core.models.families.base import POSITIONS, BenchShape, Family, RealSpec, TinySpec

__all__ = [
    "POSITIONS",
    "BenchShape",
    "Family",
    "RealSpec",
    "TinySpec",
    "all_families",
    "available",
    "for_config",
    "for_model",
    "adapter_for",
    "supported_classes",
    "get",
    "register",
]

_REGISTRY: dict[str, Family] = {}
_LOADED = False


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: registers one instance of a `Family` subclass under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty")
    if cls.positions not in POSITIONS:
        raise ValueError(f"{cls.__name__}.positions={cls.positions!r}: expected one of {POSITIONS}")
    _REGISTRY[cls.name] = cls()
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available() -> list[str]:
    """Names of the registered families, sorted."""
    _load()
    return sorted(_REGISTRY)


def all_families() -> list[Family]:
    """The registered descriptors, sorted by name."""
    _load()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get(name: str, *, where: str = "family") -> Family:
    """The descriptor called `name`.

    Raises:
        ValueError: unknown name (the message names `where` and lists `available()`).
    """
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"{where}={name!r} is not a known family; choose one of {available()}")
    return _REGISTRY[name]


def for_model(model) -> Family:
    """The family of a model instance: by its class, else by its config's `model_type`.

    Raises:
        ValueError: no family claims it (the message lists the families and their classes).
    """
    _load()
    for fam in _REGISTRY.values():
        if type(model) is fam.model_class:
            return fam
    config = getattr(model, "config", None)
    if config is not None:
        found = _by_config(config)
        if found is not None and isinstance(model, found.model_class):
            return found
    classes = sorted(f.model_class.__name__ for f in _REGISTRY.values())
    raise ValueError(
        f"no family for model class {type(model).__name__!r}; available families: "
        f"{available()} (classes {classes})"
    )


def adapter_for(model, *, positions: str | None = None):
    """The adapter of `model`'s family (an `mc_core.models.adapters.Adapter`).

    Args:
        model: a stock transformers LVLM of a registered family.
        positions: "packed" or "source" (see `Adapter`); None: the family's default.

    Raises:
        ValueError: no family for this model class (the message lists the families and the
            supported classes), or an unknown `positions`.
    """
    fam = for_model(model)
    return fam.adapter_class(model, positions=fam.positions if positions is None else positions)


def supported_classes() -> list[str]:
    """Model class names `adapter_for` accepts."""
    return sorted(f.model_class.__name__ for f in all_families())


def _by_config(config) -> Family | None:
    for fam in _REGISTRY.values():
        if fam.matches(config):
            return fam
    return None


def for_config(config) -> Family:
    """The family of a HF config, a `config.json` dict, or a checkpoint folder / config file.

    Raises:
        ValueError: no family matches its `model_type` (named), or the path has no config.json.
    """
    _load()
    where = "config"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"{path}: no config.json (not a saved model)")
        where = str(path)
        config = json.loads(path.read_text())
    found = _by_config(config)
    if found is None:
        model_type = (
            config.get("model_type")
            if isinstance(config, dict)
            else getattr(config, "model_type", None)
        )
        known = {f.name: list(f.model_types) for f in all_families()}
        raise ValueError(f"{where}: model_type={model_type!r} belongs to no family; known: {known}")
    return found
