"""Analytic prefill FLOPs of a decoder LLM from its config and the prompt length.

Counted: the LLM part of the prefill (what visual-token compression changes). The vision tower
and projector run identically for every method and are left out, as are norms, activations,
softmax and rotary embeddings (lower order). One multiply-add = 2 FLOPs.

Per layer, for a prompt of S tokens, hidden h, q heads x head_dim = h_q, kv heads x head_dim =
h_kv, MLP width I:
    projections  2 S h (h_q + 2 h_kv) + 2 S h_q h           (q, k, v, o)
    attention    2 S^2 h_q  (= QK^T and AV, each 2 S^2 h_q, halved: causal)
    MLP          2 S h I x 3 (gated: gate, up, down) or x 2 (plain)
plus the LM head on the last position only (2 h V), as generation computes it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prefill_flops", "text_config"]

# Architectures whose MLP has a gate projection (SwiGLU-style); others count two matrices.
_PLAIN_MLP = {"gpt2", "opt", "gpt_neox", "phi", "bloom", "falcon"}


def text_config(config: Any) -> Any:
    """The language-model part of an LVLM config (the config itself for a plain LLM)."""
    get = getattr(config, "get_text_config", None)
    cfg = get() if callable(get) else getattr(config, "text_config", config)
    return cfg if cfg is not None else config


def _field(cfg: Any, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"config {type(cfg).__name__} has none of {names} (needed for FLOPs)")


def prefill_flops(config: Any, seq_len: int, *, logits_positions: int = 1) -> float:
    """FLOPs of one prefill forward over `seq_len` tokens.

    Args:
        config: a model config (an LVLM's: its text config is used) with hidden_size,
            num_hidden_layers, num_attention_heads, intermediate_size, vocab_size (and
            optionally num_key_value_heads, head_dim).
        seq_len: prompt length in tokens (visual tokens included).
        logits_positions: positions the LM head runs on (1 for generation).

    Returns:
        The FLOP count (float).

    Raises:
        ValueError: a non-positive `seq_len`, or a config missing a needed field.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: expected a positive int")
    cfg = text_config(config)
    h = _field(cfg, "hidden_size", "d_model", "n_embd")
    layers = _field(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _field(cfg, "num_attention_heads", "n_head")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    inter = _field(cfg, "intermediate_size", "ffn_dim", "n_inner")
    vocab = _field(cfg, "vocab_size")
    s = float(seq_len)
    h_q, h_kv = heads * head_dim, kv_heads * head_dim
    proj = 2 * s * h * (h_q + 2 * h_kv) + 2 * s * h_q * h
    attn = 2 * s * s * h_q  # causal: half of the full 4 S^2 h_q
    mlp_mats = 2 if getattr(cfg, "model_type", "") in _PLAIN_MLP else 3
    mlp = 2 * s * h * inter * mlp_mats
    return layers * (proj + attn + mlp) + 2.0 * h * vocab * logits_positions
