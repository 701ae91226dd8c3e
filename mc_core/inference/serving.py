"""Serving path: image -> vision tower -> projector -> compressor -> embeddings for an engine.

A prompt-agnostic compressor's output depends on the image only, so an embedding worker computes
it once per image (`compress_image`) and an engine that accepts precomputed image embeddings
(vLLM with ``enable_mm_embeds``; see docs/serving.md and mc_vllm) runs the LLM on them. The
embeddings are the compressed projector output, i.e. already in the LLM's input space: the
engine must not project them again (vLLM does not).

Positions. LLaVA-style models give image tokens consecutive 1-D positions, so m tokens need
nothing beside them. Qwen-family models place image tokens by M-RoPE from an (t, h, w) patch grid,
and vLLM derives those positions from the ``image_grid_thw`` sent with the embeddings: it accepts
any grid with h * w / merge^2 == m. `engine_grid` lays the m tokens on the h' x w' = m grid
closest in aspect to the image's own merged grid (``factor_grid``; a prime m gets a 1 x m strip)
and the text after the image continues from that grid's largest position + 1. This is the
adapters' ``packed`` position handling. The ``source`` handling (each compressed token at the
P-weighted mean of its sources' positions, text continuing after the uncompressed image) cannot
be expressed as a grid, so an engine fed embeddings cannot reproduce it: serve Qwen models with
a compressor trained and evaluated with packed positions, or expect the gap between the two
(reports/eval). Padding m up to a grid is not an option either: the extra tokens would be
attended to.

Example:
    >>> model, processor = zoo.load("models/base/tiny-qwen2-vl")
    >>> emb = compress_image(model, processor, compressor, image)
    >>> save_embeds(emb, "cat.safetensors")      # mc_vllm sends it to vLLM
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mc_core.inference.compress import compress_inputs
from mc_core.inference.embeds import ImageEmbeds, save_embeds
from mc_core.io import staged_dir
from mc_core.models.adapters.qwen2_vl import factor_grid
from mc_core.models.families import adapter_for
from mc_core.runtime import model_device

__all__ = [
    "compress_image",
    "engine_adapter",
    "engine_grid",
    "export_for_vllm",
    "save_embeds",
]

# Processor classes of mc_core.models.processing that stock transformers (the engine's) does not
# know.
_STOCK_PROCESSOR = {
    "OfflineQwen2VLProcessor": "Qwen2VLProcessor",
    "OfflineQwen2_5_VLProcessor": "Qwen2_5_VLProcessor",
    "OfflineInternVLProcessor": "InternVLProcessor",
}
_VIDEO_PROCESSOR = {
    "OfflineQwen2VLProcessor": "Qwen2VLVideoProcessor",
    "OfflineQwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
}


def engine_grid(m: int, grid: tuple[int, int], merge: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid an engine lays m Qwen tokens on.

    Args:
        m: tokens kept.
        grid: the image's own token grid (h, w) after merging (``image_grid_thw / merge``).
        merge: the vision tower's spatial merge size.

    Returns:
        ``(1, h' * merge, w' * merge)`` with h' * w' = m and h' / w' closest to h / w.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m={m!r}: expected a positive int")
    hh, ww, _ = factor_grid(m, *grid)
    return (1, hh * merge, ww * merge)


def engine_adapter(model):
    """The family adapter with ``positions="packed"``: compressed tokens placed as an engine
    fed embeddings places them.

    The transformers reference of a served dialogue is then
    `Conversation(..., adapter=engine_adapter(model))`. For LLaVA-style models "packed" is
    the only layout there is (consecutive 1-D positions). For Qwen-family models it is the
    `engine_grid` layout whenever that grid is within the adapter's aspect limit
    (``max_aspect_error``, a factor 2); beyond it (e.g. a prime m on a square image) the
    transformers adapter falls back to 1-D positions, which vLLM cannot express, so served
    answers may differ from the reference for such m.
    """
    return adapter_for(model, positions="packed")


def _image_inputs(processor, image, device, dtype) -> dict[str, Any]:
    """Processor output for a prompt holding only the image (all the adapter reads)."""
    from mc_core.inference.dialogue import to_device

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}],
        add_generation_prompt=False,
        tokenize=False,
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    return to_device(dict(inputs), device, dtype)


@torch.no_grad()
def compress_image(
    model,
    processor,
    compressor,
    image,
    *,
    adapter=None,
    meta: dict[str, str] | None = None,
    rate: float | None = None,
) -> ImageEmbeds:
    """One image's compressed tokens in the LLM's input space, with the engine's grid.

    Args:
        model: the LVLM (its vision tower and projector run here; the LLM does not).
        processor: its processor.
        compressor: a prompt-agnostic compressor (trained or heuristic), or None to send all
            the visual tokens (the uncompressed baseline).
        image: a PIL image.
        adapter: the family adapter (default: `engine_adapter(model)`; the tokens do not
            depend on its position handling).
        meta: strings stored with the embeddings (model, compressor).
        rate: compress at this rate (a request's own) instead of the compressor's; ignored
            without a compressor. The embeddings' meta records the rate used.

    Returns:
        `ImageEmbeds` with embeds [m, d] (the model's dtype, on the CPU) and, for Qwen-family
        models, ``grid_thw`` from `engine_grid`.

    Raises:
        ValueError: a prompt-dependent compressor (its tokens depend on the question, so they
            cannot be computed once per image), or an image the processor rejects.
    """
    if compressor is not None and getattr(compressor, "prompt_dependent", False):
        raise ValueError(
            f"compressor {compressor.name!r} is prompt-dependent: serving computes one set of "
            "tokens per image before any question; use a prompt-agnostic compressor"
        )
    adapter = adapter if adapter is not None else engine_adapter(model)
    dtype = next(model.parameters()).dtype
    inputs = _image_inputs(processor, image, model_device(model), dtype)
    if compressor is None:
        (tokens,) = adapter.visual_tokens(inputs)
    else:
        _, ys, _ = compress_inputs(model, adapter, compressor, inputs, rate=rate)
        (tokens,) = ys
    n = adapter.placeholder_counts(inputs)[0]
    grid = None
    if inputs.get("image_grid_thw") is not None:  # grid-positioned (M-RoPE) families
        merge = int(model.config.vision_config.spatial_merge_size)
        _, h, w = (int(v) for v in inputs["image_grid_thw"][0].tolist())
        grid = engine_grid(int(tokens.shape[0]), (h // merge, w // merge), merge)
    info = {"model_class": type(model).__name__, **(meta or {})}
    if compressor is not None:
        used = compressor.rate if rate is None else float(rate)
        info.setdefault("compressor", f"{compressor.name}@{used}")
    return ImageEmbeds(
        embeds=tokens.detach().cpu(), family=adapter.family, n=int(n), grid_thw=grid, meta=info
    )


def export_for_vllm(model, processor, path_dir: str | os.PathLike) -> Path:
    """Saves `model` + `processor` in the layout vLLM 0.32 loads (a folder, atomically).

    Two differences from ``save_pretrained`` under transformers 5.x:
      - LLaVA-style models: transformers 5 writes the CLIP tower as ``vision_tower.*``; vLLM's
        loader expects ``vision_tower.vision_model.*`` (transformers reads both).
      - processors built by mc_core.models.processing record their offline class names; the engine's
        stock transformers knows the parent classes, so those are written instead (Qwen: plus
        the video processor config the stock class loads, from the image settings).

    Real checkpoints from the hub need none of this: point vLLM at them directly.
    """
    from safetensors.torch import load_file, save_file

    target = Path(path_dir)
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if model.config.model_type in ("llava", "llava_next"):
            for f in sorted(tmp.glob("*.safetensors")):
                state = load_file(str(f))
                renamed = {_clip_key(k): v for k, v in state.items()}
                if renamed.keys() != state.keys():
                    save_file(renamed, str(f), metadata={"format": "pt"})
            index = tmp / "model.safetensors.index.json"
            if index.is_file():
                _rename_index(index)
        cfg = tmp / "processor_config.json"
        if cfg.is_file():
            _stock_processor_class(cfg)
    return target


def _clip_key(key: str) -> str:
    for prefix in ("model.vision_tower.", "vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix) :]
    return key


def _rename_index(index: Path) -> None:
    import json

    data = json.loads(index.read_text())
    data["weight_map"] = {_clip_key(k): v for k, v in data.get("weight_map", {}).items()}
    index.write_text(json.dumps(data, indent=2))


def _stock_processor_class(cfg: Path) -> None:
    import json

    data = json.loads(cfg.read_text())
    name = data.get("processor_class")
    if name not in _STOCK_PROCESSOR:
        return
    data["processor_class"] = _STOCK_PROCESSOR[name]
    cfg.write_text(json.dumps(data, indent=2))
    image = data.get("image_processor")
    if name in _VIDEO_PROCESSOR and isinstance(image, dict):
        # The stock Qwen processors load a video processor too: the image settings serve.
        video = {k: v for k, v in image.items() if k != "image_processor_type"}
        video["video_processor_type"] = _VIDEO_PROCESSOR[name]
        (cfg.parent / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
