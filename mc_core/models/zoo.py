"""Named base models: tiny architectures for the embedded world, Hugging Face ids for real ones.

Every name comes from a family descriptor (`mc_core.models.families`): `TINY` gathers the
descriptors'
tiny world architectures, `REAL` their real checkpoints. Tiny models use the real transformers
classes built from config with random weights and the offline word-level processors of
``mc_core.models.processing``. Their image geometry is sized to the synthetic world (224 px images,
objects 14-21 px): every architecture sees the objects as about 1-1.5 token footprints (14 px),
so 90% reduction bites.

    tiny-llava       CLIP 224 px / patch 14 -> 16 x 16 = 256 visual tokens (LLaVA-1.5 style)
    tiny-llava-next  CLIP 224 px crops, anyres: a 224 px image gives a 16 x 16 base view plus
                     one 16 x 16 crop with a newline per row (528 tokens); a 224 x 448 image
                     gets two crops (784 tokens)
    tiny-qwen2-vl    Qwen2-VL tower, patch 14, 2 x 2 merge; the processor upsizes 224 px to
                     336 px (min_pixels) -> 12 x 12 = 144 tokens (the
                     tower has rotary positions only: the LLM locates tokens through mrope)

Real base models are not copied: :func:`save_resolved` writes a folder holding the pinned
record of where they come from (``resolved.json``, see ``mc_core.models.hub``) beside ``zoo.json``,
and
:func:`load` loads such a folder from the machine's hub cache or local folder, after checking
the weights are still the recorded ones. ``load_real`` (by name, may download) is never called
by the tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mc_core.io import staged_dir
from mc_core.models import families
from mc_core.models.families import RealSpec, TinySpec
from mc_core.models.processors import build_processor, load_processor

__all__ = [
    "REAL",
    "TINY",
    "RealSpec",
    "TinySpec",
    "build",
    "info",
    "load",
    "load_real",
    "save",
    "save_resolved",
]

_ZOO_FILE = "zoo.json"  # beside the weights: arch name and family, so load() needs no guessing
RESOLVED_FILE = (
    "resolved.json"  # a real model's pinned source (mc_core.models.hub), instead of weights
)

TINY: dict[str, TinySpec] = {
    name: spec for fam in families.all_families() for name, spec in fam.tiny.items()
}
REAL: dict[str, RealSpec] = {
    name: spec for fam in families.all_families() for name, spec in fam.real.items()
}


def _spec(arch: str) -> TinySpec:
    if arch not in TINY:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; choose one of {sorted(TINY)}")
    return TINY[arch]


def build(
    arch: str | TinySpec,
    *,
    vocab: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A tiny architecture with random weights and its offline processor.

    Args:
        arch: a name in ``TINY`` or a ``TinySpec`` (e.g. ``TINY[name].with_sizes(...)``, or a
            family's test spec ``families.get(f).test``).
        vocab: tokenizer words (default: the synthetic world's vocabulary).
        seed: torch seed of the random init (same seed, same weights).
        attn_implementation: "sdpa" or "eager" (eager returns attention maps).

    Returns:
        ``(model, processor)``; the model is in eval mode, float32.
    """
    spec = arch if isinstance(arch, TinySpec) else _spec(arch)
    fam = families.get(spec.family, where=f"{spec.name}.family")
    if vocab is None:
        from mc_core.data.synthetic import vocabulary

        vocab = vocabulary()
    processor = build_processor(spec.family, vocab, **spec.image_cfg)
    config = fam.tiny_config(spec, processor.tokenizer)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fam.model_class(config)
    model.config.arch = spec.name  # recorded in config.json for load()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor


def save(model, processor, path_dir: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Writes ``model`` + ``processor`` in the save_pretrained layout, atomically.

    The folder appears complete or not at all (``mc_core.io.staged_dir``).

    Args:
        model: a model of a registered family.
        processor: its processor.
        path_dir: the destination folder.
        meta: extra JSON-serialisable facts stored in ``zoo.json`` (arch, training summary).
    """
    family = _family_of(model)
    path = Path(path_dir)
    with staged_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        facts = {"family": family, "arch": getattr(model.config, "arch", None), **(meta or {})}
        (tmp / _ZOO_FILE).write_text(json.dumps(facts, indent=2, sort_keys=True))
    return path


def _family_of(model) -> str:
    """The family name of ``model`` (kept for callers of the old zoo API; use
    ``mc_core.models.families.for_model``)."""
    return families.for_model(model).name


def save_resolved(record: dict, path_dir: str | os.PathLike, *, arch: str) -> Path:
    """Writes a real base model's folder, atomically: ``resolved.json`` (``record``, a
    ``mc_core.models.hub.Resolved.to_dict()``) and ``zoo.json`` (arch, family, source, revision).

    Both files are canonical JSON (sorted keys), so the same weights give the same bytes.
    """
    path = Path(path_dir)
    facts = {
        "arch": arch,
        "family": record["family"],
        "kind": "real",
        "source": record["source"],
        "revision": record.get("revision"),
        "fingerprint": record.get("fingerprint"),
    }
    with staged_dir(path) as tmp:
        for name, obj in ((RESOLVED_FILE, record), (_ZOO_FILE, facts)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return path


def load(
    path_dir: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str | None = None,
):
    """Loads a base model: one saved by :func:`save`, or a real one recorded by
    :func:`save_resolved` (offline: from the hub cache or the recorded local folder).

    Args:
        path_dir: the base model's folder (``models/base/<arch>``).
        attn_implementation: "sdpa" or "eager".
        dtype: the weights' dtype. None: as saved for a tiny model; for a real one bfloat16
            where CUDA is available (what ``mc_core.runtime.prepare_model`` casts to there,
            so a
            7B model is never materialised in float32 first), float32 otherwise.

    Returns:
        ``(model, processor)``, model in eval mode.

    Raises:
        ValueError: the folder is not a saved base model (names the missing file), its
            family is unknown, or a real model's weights are missing or changed on this machine.
    """
    path = Path(path_dir)
    info_file = path / _ZOO_FILE
    if not info_file.is_file():
        raise ValueError(f"{path}: not a saved base model ({_ZOO_FILE} missing)")
    fam = families.get(json.loads(info_file.read_text()).get("family"), where=f"{info_file} family")
    if (path / RESOLVED_FILE).is_file():
        return _load_resolved(path / RESOLVED_FILE, fam, attn_implementation, dtype)
    processor = load_processor(path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = fam.model_class.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation, **kwargs
    )
    return model.eval(), processor


def _load_resolved(record_file: Path, fam, attn_implementation: str, dtype):
    from mc_core.models import hub

    record = json.loads(record_file.read_text())
    if record.get("model_class") != fam.model_class.__name__:
        raise ValueError(
            f"{record_file}: model_class={record.get('model_class')!r} but family "
            f"{fam.name!r} loads {fam.model_class.__name__}"
        )
    folder = hub.locate(record, where=str(record_file))  # the recorded bytes, or ValueError
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = fam.model_class.from_pretrained(
        folder, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval(), _real_processor(folder, fam)


def _real_processor(folder: Path, fam):
    """The checkpoint's own processor: AutoProcessor, or the family's class where that cannot
    load it here (a class of this library saved by name; a video processor without
    torchvision, which the family's offline class leaves out)."""
    import importlib.util

    import transformers

    from mc_core.models.processing import NoVideoMixin

    config = folder / "processor_config.json"
    saved = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    if saved == fam.processor_class.__name__ or (
        issubclass(fam.processor_class, NoVideoMixin)
        and importlib.util.find_spec("torchvision") is None
    ):
        return fam.processor_class.from_pretrained(folder, local_files_only=True)
    return transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)


def info(path_dir: str | os.PathLike) -> dict:
    """The ``zoo.json`` facts of a saved base model (family, arch, meta)."""
    return json.loads((Path(path_dir) / _ZOO_FILE).read_text())


def load_real(name: str, *, dtype: torch.dtype = torch.bfloat16, device_map: str | None = "auto"):
    """Loads a real base model and its processor from the hub (network; never used in tests)."""
    if name not in REAL:
        raise ValueError(f"real model {name!r} unknown; choose one of {sorted(REAL)}")
    import transformers

    spec = REAL[name]
    cls = getattr(transformers, spec.model_class)
    model = cls.from_pretrained(spec.hf_id, dtype=dtype, device_map=device_map)
    processor = transformers.AutoProcessor.from_pretrained(spec.hf_id)

    return model.eval(), processor
