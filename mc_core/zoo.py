"""Named base models: tiny architectures for the embedded world, Hugging Face ids for real ones.

Tiny models use the real transformers classes (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``) built from config
with random weights, and the offline word-level processors of ``mc_core.processing``. Their
image geometry is sized to the synthetic world (224 px images, objects 14-21 px): every
architecture sees the objects as about 1-1.5 token footprints (14 px), so 90% reduction bites.

    tiny-llava       CLIP 224 px / patch 14 -> 16 x 16 = 256 visual tokens (LLaVA-1.5 style)
    tiny-llava-next  CLIP 224 px crops, anyres: a 224 px image gives a 16 x 16 base view plus
                     one 16 x 16 crop with a newline per row (528 tokens); a 224 x 448 image
                     gets two crops (784 tokens)
    tiny-qwen2-vl    Qwen2-VL tower, patch 14, 2 x 2 merge -> 8 x 8 = 64 tokens at 224 px (the
                     tower has rotary positions only: the LLM locates tokens through mrope)

Real specs (``REAL``) name the hub checkpoints and their processor settings; ``load_real`` is the
only code that touches the hub and is never called by the tests.

In transformers 5.23 a 2-layer CLIP tower must use ``vision_feature_layer=-1`` (the default -2
would drop its last layer).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mc_core.processing import build_processor, load_processor, special_tokens

__all__ = ["REAL", "TINY", "RealSpec", "TinySpec", "build", "load", "load_real", "save"]

_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}
_ZOO_FILE = "zoo.json"  # beside the weights: arch name and family, so load() needs no guessing


@dataclass(frozen=True)
class TinySpec:
    """A tiny architecture: family, sizes and the processor's image settings.

    Attributes:
        name: the architecture name (``tiny-llava`` ...).
        family: processor / adapter family (``llava``, ``llava_next``, ``qwen2_vl``).
        text_hidden, text_layers, text_heads, text_intermediate: the LLM.
        vision_hidden, vision_layers, vision_heads, vision_intermediate: the tower.
        image_cfg: keyword arguments of ``build_processor`` (image geometry).
        vision_image_size: the tower's input side (a crop's side for anyres models).
        patch_size: the tower's patch side in pixels.
    """

    name: str
    family: str
    image_cfg: dict[str, Any]
    vision_image_size: int
    patch_size: int
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    rope_theta: float = 10000.0

    def with_sizes(self, **sizes: int) -> TinySpec:
        """A copy with other sizes (tests use text_hidden 64 / vision_hidden 32)."""
        known = {"text_hidden", "text_layers", "text_heads", "text_intermediate",
                 "vision_hidden", "vision_layers", "vision_heads", "vision_intermediate",
                 "rope_theta"}
        bad = sorted(set(sizes) - known)
        if bad:
            raise ValueError(f"with_sizes: unknown size keys {bad}; expected a subset of "
                             f"{sorted(known)}")
        return TinySpec(**{**self.__dict__, **sizes})


@dataclass(frozen=True)
class RealSpec:
    """A real base model on the hub: id, family and its processor settings."""

    name: str
    hf_id: str
    family: str
    model_class: str
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


TINY: dict[str, TinySpec] = {
    "tiny-llava": TinySpec(
        name="tiny-llava",
        family="llava",
        image_cfg={"image_size": 224, "patch_size": 14},
        vision_image_size=224,
        patch_size=14,
    ),
    "tiny-llava-next": TinySpec(
        name="tiny-llava-next",
        family="llava_next",
        image_cfg={
            "image_size": 224,
            "patch_size": 14,
            # [height, width] multiples of the crop side. A 224 px square is one crop plus the
            # base view (both whole-image views, so the tower's position table locates every
            # token); a 224 x 448 image gets two crops. Smaller crops would hide from the tower
            # which crop a token came from.
            "grid_pinpoints": [[224, 224], [224, 448], [448, 224], [448, 448]],
        },
        vision_image_size=224,
        patch_size=14,
    ),
    "tiny-qwen2-vl": TinySpec(
        name="tiny-qwen2-vl",
        family="qwen2_vl",
        # Patch 14 (objects 1-1.5 patches wide) merged 2 x 2: 8 x 8 = 64 tokens of 28 px at
        # 224 px (a multiple of patch * merge, inside [min, max] pixels: kept as is).
        image_cfg={"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                   "min_pixels": 56 * 56, "max_pixels": 448 * 448},
        vision_image_size=224,
        patch_size=14,
        # The rotary-only tower cannot know where a token is: the LLM reads it from mrope.
        # theta 10 gives the height / width sections (the lowest frequencies) a visible
        # rotation over an 8-token grid (theta 1e4 leaves the width section at < 0.03 rad).
        rope_theta=10.0,
    ),
}

REAL: dict[str, RealSpec] = {
    "llava-1.5-7b": RealSpec(
        name="llava-1.5-7b", hf_id="llava-hf/llava-1.5-7b-hf", family="llava",
        model_class="LlavaForConditionalGeneration",
        processor_kwargs={"image_size": 336, "patch_size": 14,
                          "vision_feature_select_strategy": "default"},
        notes="CLIP ViT-L/14-336, 576 visual tokens, vision_feature_layer=-2",
    ),
    "llava-next-7b": RealSpec(
        name="llava-next-7b", hf_id="llava-hf/llava-v1.6-vicuna-7b-hf", family="llava_next",
        model_class="LlavaNextForConditionalGeneration",
        processor_kwargs={"image_size": 336, "patch_size": 14,
                          "grid_pinpoints": [[336, 672], [672, 336], [672, 672],
                                             [1008, 336], [336, 1008]]},
        notes="anyres up to 2x2 crops of 336 px plus the base view (<= 2880 tokens)",
    ),
    "qwen2-vl-7b": RealSpec(
        name="qwen2-vl-7b", hf_id="Qwen/Qwen2-VL-7B-Instruct", family="qwen2_vl",
        model_class="Qwen2VLForConditionalGeneration",
        processor_kwargs={"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
                          "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2},
        notes="dynamic resolution, 2x2 merge, mrope",
    ),
    "qwen2.5-vl-7b": RealSpec(
        name="qwen2.5-vl-7b", hf_id="Qwen/Qwen2.5-VL-7B-Instruct", family="qwen2_5_vl",
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_kwargs={"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
                          "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2},
        notes="window attention tower, 2x2 merge, mrope",
    ),
    "internvl3-8b": RealSpec(
        name="internvl3-8b", hf_id="OpenGVLab/InternVL3-8B-hf", family="internvl",
        model_class="InternVLForConditionalGeneration",
        processor_kwargs={"image_size": 448, "patch_size": 14, "downsample_ratio": 0.5,
                          "crop_to_patches": True, "min_patches": 1, "max_patches": 12},
        notes="in-library member of the InternLM-XComposer family; 256 tokens per tile",
    ),
}


def _spec(arch: str) -> TinySpec:
    if arch not in TINY:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; choose one of {sorted(TINY)}")
    return TINY[arch]


def _config(spec: TinySpec, tokenizer) -> Any:
    vocab = len(tokenizer)
    sp = special_tokens(spec.family)
    image_id = tokenizer.convert_tokens_to_ids(sp["image"])
    text_common = dict(
        vocab_size=vocab, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    if spec.family in ("llava", "llava_next"):
        vision = CLIPVisionConfig(
            hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
            image_size=spec.vision_image_size, patch_size=spec.patch_size, projection_dim=32,
        )
        text = LlamaConfig(**text_common)
        common = dict(
            vision_config=vision, text_config=text, image_token_id=image_id,
            vision_feature_layer=-1,  # 2-layer tower: -2 would drop its last layer
            vision_feature_select_strategy="default", projector_hidden_act="gelu",
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        )
        if spec.family == "llava":
            return LlavaConfig(image_seq_length=(spec.vision_image_size // spec.patch_size) ** 2,
                               **common)
        return LlavaNextConfig(image_grid_pinpoints=spec.image_cfg["grid_pinpoints"], **common)
    # qwen2_vl: mrope sections must sum to head_dim / 2.
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    t = half // 4
    sections = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(
        **text_common, model_type="qwen2_vl_text",
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                         "mrope_section": sections},
    )
    vision = dict(
        depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
        num_heads=spec.vision_heads, mlp_ratio=spec.vision_intermediate // spec.vision_hidden,
        patch_size=spec.patch_size, spatial_merge_size=spec.image_cfg["merge_size"],
        temporal_patch_size=spec.image_cfg["temporal_patch_size"],
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=image_id,
        video_token_id=tokenizer.convert_tokens_to_ids(sp["video"]),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(sp["vision_start"]),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(sp["vision_end"]),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def build(arch: str | TinySpec, *, vocab: list[str] | None = None, seed: int = 0,
          attn_implementation: str = "sdpa"):
    """A tiny architecture with random weights and its offline processor.

    Args:
        arch: a name in ``TINY`` or a ``TinySpec`` (e.g. ``TINY[name].with_sizes(...)``).
        vocab: tokenizer words (default: the synthetic world's vocabulary).
        seed: torch seed of the random init (same seed, same weights).
        attn_implementation: "sdpa" or "eager" (eager returns attention maps).

    Returns:
        ``(model, processor)``; the model is in eval mode, float32.
    """
    spec = arch if isinstance(arch, TinySpec) else _spec(arch)
    if vocab is None:
        from mc_core.data.synthetic import vocabulary

        vocab = vocabulary()
    processor = build_processor(spec.family, vocab, **spec.image_cfg)
    config = _config(spec, processor.tokenizer)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[spec.family](config)
    model.config.arch = spec.name  # recorded in config.json for load()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor


def save(model, processor, path_dir: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Writes ``model`` + ``processor`` in the save_pretrained layout, atomically.

    The folder appears complete or not at all: everything is written to a temporary sibling,
    then renamed over ``path_dir`` (a previous model there is replaced only at the end).

    Args:
        model: a tiny model (or any of the supported classes).
        processor: its processor.
        path_dir: the destination folder.
        meta: extra JSON-serialisable facts stored in ``zoo.json`` (arch, training summary).
    """
    path = Path(path_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    family = _family_of(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        info = {"family": family, "arch": getattr(model.config, "arch", None), **(meta or {})}
        (tmp / _ZOO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        # mkdtemp makes the folder private and some writers do the same to files: an output
        # others read (DVC, other stages) gets ordinary permissions.
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "d")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "d").exists() and not path.exists():
            os.replace(old / "d", path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _family_of(model) -> str:
    for family, cls in _MODEL_CLASSES.items():
        if isinstance(model, cls):
            return family
    raise ValueError(f"model class {type(model).__name__} is not one of "
                     f"{[c.__name__ for c in _MODEL_CLASSES.values()]}")


def load(path_dir: str | os.PathLike, *, attn_implementation: str = "sdpa"):
    """Loads a base model saved by :func:`save` (offline, no hub).

    Returns:
        ``(model, processor)``, model in eval mode.

    Raises:
        ValueError: the folder is not a saved base model (names the missing file).
    """
    path = Path(path_dir)
    info_file = path / _ZOO_FILE
    if not info_file.is_file():
        raise ValueError(f"{path}: not a saved base model ({_ZOO_FILE} missing)")
    info = json.loads(info_file.read_text())
    family = info.get("family")
    if family not in _MODEL_CLASSES:
        raise ValueError(f"{info_file}: family={family!r} is not one of {sorted(_MODEL_CLASSES)}")
    processor = load_processor(path)
    model = _MODEL_CLASSES[family].from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation
    )
    return model.eval(), processor


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
