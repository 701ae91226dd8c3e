"""Peak device memory of one training step, estimated before any is allocated.

A step holds the frozen LVLM's weights, the activations its compressed forward keeps for the
backward pass into ``inputs_embeds`` (where the generator's tokens enter), the answer-position
logits and the KL's temporaries over the vocabulary, the generator with its gradient and SGD
momentum, and one layer's worth of gradients while the backward runs.

What the frozen forward keeps, per token and decoder layer (Llama-style: RMSNorm, rotary
attention, SwiGLU MLP), when only the inputs need a gradient: a linear layer with a frozen
weight keeps nothing of its input (the input's gradient needs only the weight), so what stays
is what the non-linear ops keep:

- each of the 2 RMSNorms: its input upcast to float32 (4 h bytes, any model dtype);
- attention: q, k, v and the output (``sdpa``: fused kernels keep these plus a float32
  log-sum-exp per head; GQA keys and values repeated to the query heads count at the query
  width, as transformers repeats them before SDPA), plus for ``eager`` attention the float32
  softmax and its ``dtype`` copy (``(4 + b) * heads * L`` bytes per token: quadratic in L);
- the MLP: the gate output (SiLU's input), SiLU's output and the up projection (3 I values);
- a right-padded batch (more than one dialogue) also passes SDPA a 4-D additive mask, kept by
  every layer: ``b * L`` bytes per token per layer, quadratic in L like eager attention.

With h hidden, I MLP width, b bytes per value of the model dtype:
``8 h + b (2 q + 2 kv') + 4 heads + 3 b I`` bytes per token per layer (q = heads * head_dim,
kv' = q when repeated). The tests check this against the tensors autograd actually saves on a
tiny model, and the weights against the parameter bytes exactly.

With activation checkpointing (transformers' per-layer checkpointing, non-reentrant
``torch.utils.checkpoint``) a decoder layer keeps only its input hidden state (``b h`` bytes per
token); the rotary cos / sin and the padded batch's boolean mask are kept once, in the
checkpoint's closure, for all layers. The backward recomputes one layer at a time, so one
layer's full activations come back as a transient beside its gradients.

With ``vision="recompute"`` (``TrainConfig.visual_tokens``) each step runs the frozen vision
tower and projector under ``no_grad`` for its images. Nothing of it is kept for the backward;
its transient peak is one tower layer's working set for all the step's images (residual stream,
the normed input, then q / k / v and the outputs, or the MLP's two ``I`` wide values), the
pixel values, and, where the family selects a layer other than the last (LLaVA's ``-2``), every
layer's hidden state, which ``output_hidden_states`` keeps until the tower returns.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "VISION_MODES",
    "estimate",
    "format_estimate",
    "meta_model",
    "tower_tokens",
    "vision_shape",
]

_GIB = 1024**3
VISION_MODES = ("store", "recompute")  # TrainConfig.visual_tokens


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, dtype)
    raise ValueError(f"estimate: dtype={dtype!r}: expected float32, bfloat16 or float16")


def meta_model(config):
    """The model of a config on the meta device: exact parameter shapes, no memory."""
    from mc_core.models import families

    with torch.device("meta"):
        return families.for_config(config).model_class._from_config(config)


def _weight_bytes(model, dtype: torch.dtype) -> int:
    """Parameters and floating buffers at `dtype` (as `prepare_model` casts them); other buffers
    (int position ids) keep theirs."""
    size = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in model.parameters()) * size
    for b in model.buffers():
        total += b.numel() * (size if b.is_floating_point() else b.element_size())
    return int(total)


def _text_shape(config) -> dict[str, int]:
    from mc_core.inference.flops import text_config

    cfg = text_config(config)
    h, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    return dict(
        hidden=h,
        layers=int(cfg.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate=int(cfg.intermediate_size),
        vocab=int(cfg.vocab_size),
    )


def vision_shape(config) -> dict[str, Any] | None:
    """The vision tower's widths (None: the config has no tower). Qwen2-VL names the tower width
    ``embed_dim`` (its ``hidden_size`` is the LLM's) and its MLP width ``mlp_ratio``."""
    v = getattr(config, "vision_config", None)
    if v is None:
        return None
    hidden = int(getattr(v, "embed_dim", None) or v.hidden_size)
    inter = getattr(v, "intermediate_size", None) or hidden * getattr(v, "mlp_ratio", 4)
    patch = getattr(v, "patch_size", 14)
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    layer = getattr(config, "vision_feature_layer", None)
    return dict(
        hidden=hidden,
        intermediate=int(inter),
        layers=int(getattr(v, "num_hidden_layers", None) or v.depth),
        pixels=3 * int(patch) ** 2 * int(getattr(v, "temporal_patch_size", None) or 1),
        # transformers keeps every layer's output when a layer other than the last is selected
        keeps_hidden=layer is not None and layer != -1,
    )


def tower_tokens(config, n: int) -> int:
    """Patches the vision tower encodes for ``n`` visual tokens: ``n`` times the tokens each
    projector token merges (Qwen2-VL's ``spatial_merge_size`` squared, a pixel-shuffle projector's
    ``1 / downsample_ratio**2``; one for LLaVA, whose CLS and newline tokens are left out)."""
    v = getattr(config, "vision_config", None)
    merge = getattr(v, "spatial_merge_size", None)
    if merge:
        return int(n) * int(merge) ** 2
    ratio = getattr(config, "downsample_ratio", None)
    return round(n / ratio**2) if ratio else int(n)


def _vision_bytes(config, b: int, images: int, n: int, d: int) -> int:
    """Transient peak of the frozen tower + projector under no_grad for ``images`` images of
    ``n`` visual tokens each (module docstring)."""
    v = vision_shape(config)
    if v is None:
        raise ValueError(
            f"estimate: vision='recompute' but {type(config).__name__} has no vision_config"
        )
    h, i = v["hidden"], v["intermediate"]
    per_patch = b * (2 * h + max(5 * h, 2 * i) + v["pixels"])
    if v["keeps_hidden"]:
        per_patch += b * (v["layers"] + 1) * h
    return images * (tower_tokens(config, n) * per_patch + b * n * d)


def _per_token_layer(
    s: dict[str, int], b: int, attn: str, seq_len: int, padded: bool
) -> dict[str, int]:
    """Bytes kept for backward per token and decoder layer (module docstring)."""
    q = s["heads"] * s["head_dim"]
    norms = 2 * 4 * s["hidden"]
    attention = b * 4 * q + 4 * s["heads"]  # q, repeated k and v, output; fp32 log-sum-exp
    if attn == "eager":
        attention += (4 + b) * s["heads"] * seq_len
    if padded:
        attention += b * seq_len
    mlp = 3 * b * s["intermediate"]
    return {"norms": norms, "attention": attention, "mlp": mlp}


def _logit_bytes(s: dict[str, int], b: int, t: int, target_topk: int | None) -> int:
    """Bytes of the loss over ``t`` answer positions: the student logits (dtype), their float32
    copy, log-softmax, and the KL's [T, V] masks and differences in float32; the cached target
    rows on the device."""
    logits = t * s["vocab"] * (b + 3 * 4)
    logits += t * (target_topk * (2 + 4) + 4 if target_topk else s["vocab"] * 4)
    return logits


def _generator_bytes(d: int, b: int, params: int, images: int, n: int, m: int) -> int:
    """Bytes of the generator: parameters, gradients, SGD momentum (float32); per image X, P
    and Y in float32 and its dtype copy (``n`` tokens before compression, ``m`` after, width
    ``d``)."""
    per_image = 4 * (n * d + 2 * m * n + 2 * m * d) + b * m * d
    return 3 * 4 * params + images * per_image


def _activations(
    s: dict[str, int], b: int, attn: str, batch: int, seq_len: int, checkpointing: bool
) -> tuple[int, dict[str, int]]:
    """Bytes the compressed forward keeps for the backward, and the per-token-and-layer parts
    of an uncheckpointed layer."""
    tokens = batch * seq_len
    per = _per_token_layer(s, b, attn, seq_len, padded=batch > 1)
    final_norm = 4 * s["hidden"] * tokens  # the final norm's float32 input
    if not checkpointing:
        return s["layers"] * tokens * sum(per.values()) + final_norm, per
    inputs = s["layers"] * tokens * b * s["hidden"]  # each layer's input hidden state
    shared = 2 * tokens * b * s["head_dim"]  # rotary cos and sin
    if batch > 1:  # the padded batch's [B, 1, L, L] mask: bool for sdpa, additive for eager
        shared += batch * seq_len * seq_len * (1 if attn == "sdpa" else b)
    return inputs + shared + final_norm, per


def _transient(
    s: dict[str, int], b: int, attn: str, batch: int, seq_len: int, checkpointing: bool
) -> dict[str, int]:
    """What exists only for a while during the backward: one layer's activation gradients (MLP
    width and the residual) and, when checkpointing, that layer's recomputed activations (the
    mask is shared, so counted with the kept activations)."""
    tokens = batch * seq_len
    out = {"gradients": tokens * b * (3 * s["intermediate"] + 4 * s["hidden"])}
    if checkpointing:
        layer = _per_token_layer(s, b, attn, seq_len, padded=False)
        out["recomputed_layer"] = tokens * sum(layer.values())
    return out


def _resolve(model_or_config: Any, attn: str | None) -> tuple[Any, Any, str]:
    """(model, config, attention kind) of a model or a config (built on the meta device)."""
    is_model = isinstance(model_or_config, torch.nn.Module)
    config = model_or_config.config if is_model else model_or_config
    model = model_or_config if is_model else meta_model(config)
    attn = attn or getattr(config, "_attn_implementation", None) or "sdpa"
    # flash / flex kernels keep what sdpa keeps
    return model, config, attn if attn in ("sdpa", "eager") else "sdpa"


def _check_args(batch_size: int, seq_len: int, vision: str, checkpointing: bool) -> None:
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"estimate: {name}={v!r}: expected a positive int")
    if vision not in VISION_MODES:
        raise ValueError(f"estimate: vision={vision!r}: expected one of {VISION_MODES}")
    if not isinstance(checkpointing, bool):
        raise ValueError(f"estimate: activation_checkpointing={checkpointing!r}: expected a bool")


def estimate(
    model_or_config: Any,
    *,
    batch_size: int,
    seq_len: int,
    answer_tokens: int,
    dtype: str | torch.dtype = "bfloat16",
    attn: str | None = None,
    generator_params: int = 0,
    images: int | None = None,
    visual_tokens: tuple[int, int] = (576, 58),
    target_topk: int | None = 64,
    activation_checkpointing: bool = False,
    vision: str = "store",
) -> dict[str, Any]:
    """Peak memory (bytes) of one training step on one device, with its breakdown.

    Args:
        model_or_config: the LVLM, or its transformers config (built on the meta device for
            exact parameter counts; the frozen model's dtype is `dtype` either way).
        batch_size: dialogues per forward on this device (the micro-batch of a rank).
        seq_len: padded length of the compressed sequences (text + the m kept visual tokens).
        answer_tokens: answer tokens per dialogue (all turns).
        dtype: the frozen model's dtype (`mc_core.runtime.resolve_dtype`).
        attn: "sdpa" or "eager" (default: the model config's attention implementation).
        generator_params: the compressor's parameter count.
        images: images in the batch (default one per dialogue).
        visual_tokens: ``(n, m)``: visual tokens per image before and after compression.
        target_topk: k of the cached top-k targets on the device (None: full vocabulary rows).
        activation_checkpointing: the LLM's decoder layers are recomputed in the backward
            (``TrainConfig.activation_checkpointing``).
        vision: "store" (the visual tokens come from the target store) or "recompute" (the
            frozen tower and projector run every step: ``TrainConfig.visual_tokens``).

    Returns:
        dict of bytes: ``weights``, ``activations``, ``logits``, ``generator``, ``transient``,
        ``total``; ``transient_parts`` (``gradients``, and ``recomputed_layer`` /
        ``vision_tower`` when they apply), ``per_token_layer`` (bytes of each part of an
        uncheckpointed layer, per token) and ``inputs`` (the shapes used).
    """
    _check_args(batch_size, seq_len, vision, activation_checkpointing)
    dt = _dtype(dtype)
    b = torch.finfo(dt).bits // 8
    model, config, attn = _resolve(model_or_config, attn)
    s = _text_shape(config)
    ckpt = activation_checkpointing
    activations, per = _activations(s, b, attn, batch_size, seq_len, ckpt)
    n, m = visual_tokens
    images = batch_size if images is None else images
    transient = _transient(s, b, attn, batch_size, seq_len, ckpt)
    if vision == "recompute":
        # Before the LLM's forward, so it could share memory with the activations; added anyway
        # (an upper bound: the allocator may not hand the tower's blocks back in one piece).
        transient["vision_tower"] = _vision_bytes(config, b, images, n, s["hidden"])
    out: dict[str, Any] = {
        "weights": _weight_bytes(model, dt),
        "activations": int(activations),
        "logits": int(_logit_bytes(s, b, batch_size * answer_tokens, target_topk)),
        "generator": int(_generator_bytes(s["hidden"], b, generator_params, images, n, m)),
        "transient": int(sum(transient.values())),
    }
    out["total"] = sum(out.values())
    out["transient_parts"] = {k: int(v) for k, v in transient.items()}
    out["per_token_layer"] = per
    out["inputs"] = {
        **s,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "answer_tokens": answer_tokens,
        "dtype": str(dt).removeprefix("torch."),
        "attn": attn,
        "visual_tokens": [n, m],
        "images": images,
        "activation_checkpointing": ckpt,
        "vision": vision,
    }
    return out


def format_estimate(est: dict[str, Any]) -> str:
    """One line: total and parts in GiB (MiB below 1/4 GiB), with the shapes they were
    computed for."""
    parts = ("weights", "activations", "logits", "generator", "transient")
    inp = est["inputs"]
    unit, size = ("GiB", _GIB) if est["total"] >= _GIB / 4 else ("MiB", 1024**2)  # tiny models
    body = ", ".join(f"{k} {est[k] / size:.2f}" for k in parts)
    extra = "".join(
        text
        for on, text in (
            (inp.get("activation_checkpointing"), ", activation checkpointing"),
            (inp.get("vision") == "recompute", ", vision tower recomputed"),
        )
        if on
    )
    return (
        f"~{est['total'] / size:.2f} {unit} peak ({body} {unit}) for batch {inp['batch_size']} x "
        f"{inp['seq_len']} tokens, {inp['dtype']}, {inp['attn']} attention{extra}"
    )
