"""Architecture names: which archs exist, which names are safe, where a real arch comes from.

An arch is a tiny architecture (``mc_core.models.zoo.TINY``, trained by ``tasks.base``), a
built-in real one (``zoo.REAL``) or a name of params.yaml's ``models`` section (an HF id or a
local folder of your own). DVC builds stage names and output paths from arch names, MLflow model
names too, so ``grid.archs`` holds only filesystem-safe names (:data:`SAFE_NAME`); :func:`slug`
suggests one for an HF id or a path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from pydantic import Field

from mc_core.training.config import Section

__all__ = [
    "MODEL_NAMES",
    "SAFE_NAME",
    "ModelSource",
    "check_arch",
    "known_archs",
    "slug",
    "slugs",
    "source_of",
    "unsafe_arch",
]

# An arch name: DVC builds stage names (base@<arch>) and output paths from it, MLflow model
# names too. Lowercase so two names never collide on a case-insensitive filesystem.
SAFE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")

# The names of the `models` section of the params file being validated (set by
# tasks.params.document.validate): archs too, for the sections' override keys. A context variable
# because the library configs' own __init__ keeps pydantic's validation context from them.
MODEL_NAMES: ContextVar[tuple[str, ...]] = ContextVar("model_names", default=())


def known_archs(models: Iterable[str] = ()) -> list[str]:
    """Architectures ``mc_core.models.zoo`` can build (tiny) or load (real), plus ``models``
    names."""
    from mc_core.models import zoo

    return sorted(set(getattr(zoo, "TINY", {})) | set(getattr(zoo, "REAL", {})) | set(models))


def check_arch(arch: str, models: Iterable[str] = (), *, key: str = "--arch") -> str:
    """``arch`` if it is a known arch with a safe name, else ValueError naming ``key``.

    Names only (:data:`SAFE_NAME`): also keeps cell paths inside the workspace (no ``../``)."""
    known = known_archs(models)
    if arch not in known or not SAFE_NAME.match(arch):
        raise ValueError(f"{key}={arch!r}: unknown arch; known: {', '.join(known)}")
    return arch


def slug(value: str) -> str:
    """A readable arch name for an HF id or a folder: its last path part, lowercased, every run
    of other characters turned into ``-`` (``llava-hf/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``,
    ``/data/ckpt/Qwen2-VL/`` -> ``qwen2-vl``).

    Raises:
        ValueError: nothing usable is left (names the value).
    """
    last = str(value).replace("\\", "/").rstrip("/").rpartition("/")[2].lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", last)
    name = re.sub(r"-{2,}", "-", name).strip("-._")[:64].strip("-._")
    if not SAFE_NAME.match(name):
        raise ValueError(f"{value!r}: no readable name can be made of it; choose one yourself")
    return name


def slugs(values: Iterable[str], *, taken: Iterable[str] = ()) -> dict[str, str]:
    """:func:`slug` of each value; ValueError when two values (or a value and a ``taken``
    name) would get the same name."""
    out: dict[str, str] = {}
    owner = {name: None for name in taken}
    for value in values:
        name = slug(value)
        if name in owner:
            other = "an existing arch" if owner[name] is None else repr(owner[name])
            raise ValueError(
                f"{value!r} and {other} would both be named {name!r}: choose distinct names"
            )
        owner[name] = value
        out[value] = name
    return out


def unsafe_arch(i: int, archs: list[Any], models: Mapping[str, Any]) -> ValueError:
    """The error for ``archs[i]``, an HF id or a path rather than a name, with the exact fix."""
    arch = archs[i]
    head = f"[{i}]={arch!r}: grid.archs holds names (DVC builds stage names and paths from them)"
    named = [k for k, v in models.items() if isinstance(v, Mapping) and v.get("source") == arch]
    if named:
        return ValueError(f"{head}; models.{named[0]} has this source: put {named[0]!r} there")
    # Every such entry at once, so the suggested names do not collide with each other.
    unsafe = [str(a) for a in archs if not (isinstance(a, str) and SAFE_NAME.match(a))]
    try:
        name = slugs(unsafe, taken=set(known_archs(models)))[str(arch)]
    except ValueError as err:
        return ValueError(
            f"{head}, not HF ids or paths; {err}: add `models: {{<name>: {{source: '{arch}'}}}}` "
            "and put that <name> in grid.archs"
        )
    return ValueError(
        f"{head}, not HF ids or paths. Fix: add to params.yaml "
        f"`models: {{{name}: {{source: '{arch}'}}}}` and put `{name}` in grid.archs"
    )


class ModelSource(Section):
    """``models.<name>``: where a real base model comes from.

    ``source`` is anything ``from_pretrained`` takes (an HF id, resolved through the
    Hugging Face cache, or a local folder); ``revision`` pins a branch, tag or commit of an
    HF id. ``tasks.base`` records the exact files (``mc_core.models.hub``).
    """

    source: str = Field(min_length=1)
    revision: str | None = Field(None, min_length=1)


def source_of(models: Mapping[str, ModelSource], arch: str) -> ModelSource | None:
    """Where a real arch comes from: ``models.<arch>``, else the built-in ``zoo.REAL`` id;
    None for a tiny arch (trained by ``tasks.base``)."""
    from mc_core.models import zoo

    if arch in models:
        return models[arch]
    if arch in zoo.REAL:
        return ModelSource(source=zoo.REAL[arch].hf_id)
    return None
