"""What every LVLM adapter shares: placeholder rewriting and the `mm_encoder_outputs` input.

An adapter wires compression into one stock transformers LVLM family without patching it
(checked against transformers 5.23):

1. `visual_tokens(model_inputs)` runs the family's own `get_image_features` (vision tower +
   projector) and returns one `[n_i, d]` tensor per image, in the order the images appear in the
   batch (row by row, left to right).
2. A compressor turns each into `[m_i, d]`.
3. `inputs_with(model_inputs, tokens)` rewrites `input_ids` (and every other per-token tensor)
   so that image i has m_i placeholders, re-pads the batch on its original side, and passes the
   tokens through transformers' `mm_encoder_outputs={"image": BaseModelOutputWithPooling(...)}`:
   the model skips its vision tower and scatters the given features into the placeholders.

Placeholders are split by per-image counts (adjacent images' runs can touch), and each image's n_i
placeholders must be contiguous.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mc_core.compressors import TokenContext

__all__ = [
    "POSITIONS",
    "Adapter",
    "ImageSlot",
    "grid_positions",
    "prompt_attention",
    "rewrite_placeholders",
]

_CONTEXT_FIELDS = frozenset({"cls_attention", "keys", "prompt_attention"})
POSITIONS = ("packed", "source")  # see Adapter; mirrored by mc_core.models.families.POSITIONS


@dataclass(frozen=True)
class ImageSlot:
    """Where one image's placeholders sit after `rewrite_placeholders`."""

    row: int  # batch row
    start: int  # first placeholder position in the padded output row
    count: int  # number of placeholders (m_i)


def _pad_side(mask: Tensor) -> str | None:
    left = bool((mask[:, 0] == 0).any())
    right = bool((mask[:, -1] == 0).any())
    if left and right:
        raise ValueError("model_inputs['attention_mask'] has padding on both sides")
    return "left" if left else ("right" if right else None)


def _gather_rows(
    ids: Tensor, mask: Tensor, image_token_id: int, counts_in: list[int], counts_out: list[int]
) -> tuple[list[Tensor], list[tuple[int, int, int]]]:
    """Per row, the input indices the rewritten valid tokens copy (image i's first placeholder
    repeated m_i times), and (row, start among valid tokens, m_i) per image."""
    rows: list[Tensor] = []
    slots: list[tuple[int, int, int]] = []
    image = 0
    for b in range(ids.shape[0]):
        valid = mask[b].bool().nonzero().squeeze(1)  # (L_b,)
        row_ids = ids[b, valid]
        pos = (row_ids == image_token_id).nonzero().squeeze(1).tolist()
        index: list[int] = []
        cursor = p = 0
        while p < len(pos):
            if image >= len(counts_in):
                raise ValueError(
                    f"input_ids row {b} has more image placeholders than the {len(counts_in)} "
                    "images' token counts account for"
                )
            n, m = counts_in[image], counts_out[image]
            run = pos[p : p + n]
            if len(run) != n or run[-1] - run[0] != n - 1:
                raise ValueError(
                    f"image {image} (row {b}) expects {n} contiguous placeholders at position "
                    f"{pos[p]}, found {len(run)} spanning {run[-1] - run[0] + 1 if run else 0}"
                )
            index.extend(range(cursor, run[0]))
            slots.append((b, len(index), m))
            index.extend([run[0]] * m)
            cursor = run[0] + n
            p += n
            image += 1
        index.extend(range(cursor, len(row_ids)))
        rows.append(valid[torch.tensor(index, dtype=torch.long, device=ids.device)])
    if image != len(counts_in):
        raise ValueError(
            f"input_ids hold placeholders for {image} images but {len(counts_in)} token sets given"
        )
    return rows, slots


def rewrite_placeholders(
    model_inputs: dict[str, Any],
    image_token_id: int,
    counts_in: list[int],
    counts_out: list[int],
    *,
    pad_token_id: int,
) -> tuple[dict[str, Tensor], list[ImageSlot]]:
    """Replace each image's n_i placeholders with m_i and re-pad the batch.

    Args:
        model_inputs: has `input_ids` [B, L] and optionally `attention_mask` [B, L]; every other
            tensor whose first two dimensions are (B, L) (e.g. `mm_token_type_ids`) is rewritten
            the same way (new placeholders copy the value of the image's first placeholder).
        image_token_id: the placeholder id.
        counts_in: n_i per image, in batch order.
        counts_out: m_i per image (>= 1).
        pad_token_id: used where the output needs padding the input did not have.

    Returns:
        (tensors, slots): the rewritten per-token tensors (`input_ids`, `attention_mask`, ...)
        padded on the input's side (left when the input had no padding), and one `ImageSlot` per
        image.

    Raises:
        ValueError: counts do not match the placeholders, a run is not contiguous, m_i < 1.
    """
    ids = model_inputs["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("model_inputs['input_ids'] must be a [B, L] tensor")
    B, L = ids.shape
    mask = model_inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if len(counts_in) != len(counts_out):
        raise ValueError(
            f"{len(counts_in)} images in model_inputs but {len(counts_out)} token sets"
        )
    for i, m in enumerate(counts_out):
        if m < 1:
            raise ValueError(f"tokens[{i}] has {m} rows; every image needs at least one token")
    extra = {
        k: v
        for k, v in model_inputs.items()
        if isinstance(v, Tensor)
        and v.dim() >= 2
        and tuple(v.shape[:2]) == (B, L)
        and k not in ("input_ids", "attention_mask")
    }
    side = _pad_side(mask) or "left"
    if _pad_side(mask) is not None:
        # Reuse the input's own pad id (any id but the placeholder works: padding is masked).
        pad_token_id = int(ids[mask == 0][0])
    if pad_token_id == image_token_id:
        raise ValueError(f"pad_token_id {pad_token_id} equals the image placeholder id")

    rows, slots_unpadded = _gather_rows(ids, mask, image_token_id, counts_in, counts_out)
    width = max(len(r) for r in rows)
    out = {
        "input_ids": ids.new_full((B, width), pad_token_id),
        "attention_mask": mask.new_zeros((B, width)),
    }
    for k, v in extra.items():
        out[k] = v.new_zeros((B, width, *v.shape[2:]))
    offsets = []
    for b, index in enumerate(rows):
        lo = width - len(index) if side == "left" else 0
        offsets.append(lo)
        sl = slice(lo, lo + len(index))
        out["input_ids"][b, sl] = ids[b, index]
        out["attention_mask"][b, sl] = 1
        for k, v in extra.items():
            out[k][b, sl] = v[b, index]
    slots = [ImageSlot(b, offsets[b] + s, m) for b, s, m in slots_unpadded]
    return out, slots


def grid_positions(h: int, w: int, *, device=None) -> Tensor:
    """Cell centres (row, col) in [0, 1] of a row-major h x w grid."""
    r = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    c = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(h * w, 2)  # (h*w, 2)


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Softmax attention probabilities, computed in float32.

    Args:
        q: [..., H, Nq, dh]; k: [..., H, Nk, dh].

    Returns:
        [..., H, Nq, Nk].
    """
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


def _continue_after_positions(module, args, kwargs):
    """Forward pre-hook on a 1-D RoPE LVLM's inner model (installed by `positions="source"`
    adapters), mirroring what Qwen does with its `rope_deltas`:

    - on a fresh prefill with explicit `position_ids` [B, L] (those `inputs_with` builds), it
      records `rope_deltas` [B, 1] = last position + 1 - L, so the next token continues after
      the last position used (stock forwards would continue from the cache length);
    - on a cached forward without `position_ids` (a later turn, a decoding step) it passes
      `cache length + arange + rope_deltas`;
    - a fresh prefill without positions clears it (the stock layout needs no shift).
    """
    pos = kwargs.get("position_ids")
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:
        module.rope_deltas = None
        if isinstance(pos, Tensor) and pos.dim() == 2:
            width, pos = pos.shape[1], pos.detach().float()
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                pos = pos.masked_fill(~mask.bool(), float("-inf"))
            module.rope_deltas = pos.amax(dim=1, keepdim=True) + 1 - width  # (B, 1)
        return None
    if pos is not None or getattr(module, "rope_deltas", None) is None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)  # some wrappers pass it by position
    embeds = kwargs.get("inputs_embeds")
    length = (ids if ids is not None else embeds).shape[1]
    delta = module.rope_deltas
    steps = torch.arange(past, past + length, device=delta.device, dtype=delta.dtype)
    kwargs["position_ids"] = steps[None] + delta  # (B, length)
    return args, kwargs


class Adapter:
    """Base class of the per-family adapters (see the module docstring).

    Subclasses set `family` and implement `visual_tokens`, `contexts`, `placeholder_counts` and
    `_mm_encoder_inputs`; `mc_core.models.families` maps model classes to them.

    Positions (`positions=`; `families.adapter_for` passes the family descriptor's default):
        "packed": the m_i compressed tokens take m_i consecutive positions, as the HF models
            lay out any placeholder run (Qwen: on an h' x w' grid of about the original
            aspect). This is what a stock model does with fewer tokens, and the default of the
            LLaVA-like families: their towers give every token an absolute position
            embedding, so the features say where a token is.
        "source": with `inputs_with(..., P=P)`, token j of image i takes the P-weighted mean of
            its sources' positions (`P_i[j] @ positions of image i's tokens`); text keeps its
            uncompressed positions, so text after an image continues after the uncompressed
            image's last position, in every turn (cached turns continue after the last
            position used). The default of the Qwen families: their rotary-only tower puts no
            location into the features, the LLM reads it from the (M-)RoPE positions alone.
            1-D RoPE models get explicit `position_ids` [B, L]; a forward pre-hook on the
            inner model (`rope_deltas`, as Qwen keeps) continues cached forwards after them
            (manual cached forwards without `position_ids`, as `Conversation` makes; a
            `generate` call over a pre-filled cache must pass its own `position_ids`).
    With P = I (or m_i = n_i) both give the untouched model's inputs. The positions stay
    differentiable w.r.t. P, but transformers' rotary embeddings run under `torch.no_grad`
    (checked in 5.23: `LlamaRotaryEmbedding.forward`, `Qwen2VLRotaryEmbedding.forward`; they
    keep float positions, no cast to int), so no gradient reaches P through them today.
    """

    family: ClassVar[str] = ""

    def __init__(self, model, *, positions: str) -> None:
        self.model = model
        self.config = model.config
        token = getattr(model.config, "image_token_id", None)
        if token is None:
            token = getattr(model.config, "image_token_index", None)
        if token is None:
            raise ValueError(f"{type(model).__name__}.config has no image_token_id")
        self.image_token_id = int(token)
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}: expected one of {list(POSITIONS)}")
        self.positions = positions
        if positions == "source":
            self._install_position_hook()

    def _install_position_hook(self) -> None:
        """1-D RoPE families: continue cached forwards after explicit positions (see above)."""
        inner = self.model.model
        if not getattr(inner, "_mc_position_hook", False):
            inner.register_forward_pre_hook(_continue_after_positions, with_kwargs=True)
            inner._mc_position_hook = True
            inner.rope_deltas = None

    # -- what subclasses provide ------------------------------------------------------------
    def visual_tokens(self, model_inputs) -> list[Tensor]:
        """Projector output per image: list of [n_i, d], batch order."""
        raise NotImplementedError

    def contexts(self, model_inputs, need: frozenset[str] = frozenset()) -> list[TokenContext]:
        """TokenContext per image: positions (and grid when exact) always; `cls_attention` and
        `keys` when named in `need`. "prompt_attention" in `need` is accepted and left empty:
        it depends on the prompt, fill it from `mc_core.models.adapters.prompt_attention`."""
        raise NotImplementedError

    @staticmethod
    def _check_need(need) -> frozenset[str]:
        need = frozenset(need)
        unknown = need - _CONTEXT_FIELDS
        if unknown:
            raise ValueError(
                f"contexts need={sorted(unknown)} unknown; fields are {sorted(_CONTEXT_FIELDS)}"
            )
        return need

    def _mm_encoder_inputs(
        self, model_inputs, tokens: list[Tensor], slots: list[ImageSlot], rewritten: dict
    ) -> dict[str, Any]:
        """Family-specific extra inputs (`mm_encoder_outputs`, grids...)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Width d of the visual tokens (the LLM hidden size)."""
        cfg = getattr(self.config, "text_config", self.config)
        return int(cfg.hidden_size)

    def reset_state(self) -> None:
        """Forget state the model keeps between calls (`rope_deltas`) before an unrelated
        forward; a cached continuation of the same dialogue must keep it."""
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None

    def _pad_token_id(self) -> int:
        for cfg in (
            self.model.generation_config,
            getattr(self.config, "text_config", None),
            self.config,
        ):
            pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if isinstance(pad, int) and pad != self.image_token_id:
                return pad
        return 0 if self.image_token_id != 0 else 1

    def _check_tokens(self, tokens: list[Tensor], expect: int | None = None) -> None:
        if not isinstance(tokens, (list, tuple)):
            raise ValueError(
                f"tokens must be a list of [m_i, d] tensors, got {type(tokens).__name__}"
            )
        if expect is not None and len(tokens) != expect:
            raise ValueError(
                f"tokens has {len(tokens)} entries but model_inputs hold {expect} images"
            )
        for i, t in enumerate(tokens):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != self.dim:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"tokens[{i}] has shape {shape}, expected (m, {self.dim})")

    def placeholder_counts(self, model_inputs) -> list[int]:
        """n_i per image as the processor laid them out (no vision tower run)."""
        raise NotImplementedError

    def inputs_with(
        self, model_inputs, tokens: list[Tensor], *, P: list[Tensor] | None = None
    ) -> dict[str, Any]:
        """Model inputs with image i represented by `tokens[i]` ([m_i, d]) instead of its pixels.

        Args:
            model_inputs: what the family's processor returned for the batch.
            tokens: one [m_i, d] tensor per image (batch order), e.g. a compressor's output.
            P: optional [m_i, n_i] per image, how each token mixes the image's original tokens
                (the compressor's P). Under `positions="source"` it places the tokens (and is
                required wherever m_i != n_i); under "packed" it is only checked.

        Returns:
            A dict for `model(**d)` / `model.generate(**d)`: `input_ids` and `attention_mask`
            with m_i placeholders per image, `mm_encoder_outputs`, any family extras, and under
            "source" with P the `position_ids` of the whole sequence. Keep its attention mask:
            without one, transformers reads jumps in `position_ids` as packed sequences.

        Raises:
            ValueError: token or P shapes not matching the placeholders, or "source" with
                compressed tokens and no P.
        """
        counts_in = self.placeholder_counts(model_inputs)
        self._check_tokens(tokens, expect=len(counts_in))
        counts_out = [int(t.shape[0]) for t in tokens]
        rewritten, slots = rewrite_placeholders(
            model_inputs,
            self.image_token_id,
            counts_in,
            counts_out,
            pad_token_id=self._pad_token_id(),
        )
        if P is not None:
            self._check_p(P, tokens, counts_in)
        elif self.positions == "source" and counts_out != counts_in:
            raise ValueError(
                f"positions='source' places each compressed token by P, but P is None for "
                f"{counts_out} tokens from {counts_in}: pass P=..., or build the adapter with "
                "positions='packed'"
            )
        out = dict(rewritten)
        out.update(self._mm_encoder_inputs(model_inputs, tokens, slots, rewritten))
        if P is not None and self.positions == "source":
            out.update(self._positions_from_p(model_inputs, P, rewritten))
        return out

    @staticmethod
    def _check_p(P, tokens: list[Tensor], counts_in: list[int]) -> None:
        if not isinstance(P, (list, tuple)) or len(P) != len(tokens):
            got = len(P) if isinstance(P, (list, tuple)) else type(P).__name__
            raise ValueError(f"P must be a list of {len(tokens)} [m_i, n_i] tensors, got {got}")
        for i, (p, t, n) in enumerate(zip(P, tokens, counts_in, strict=True)):
            want = (int(t.shape[0]), n)
            if not isinstance(p, Tensor) or tuple(p.shape) != want:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"P[{i}] has shape {shape}, expected {want} (tokens[{i}] x n_i)")

    def _original_positions(self, model_inputs) -> Tensor:
        """[D, B, L] positions of the uncompressed input (D = 1 for 1-D RoPE): each valid
        token's index among the row's valid tokens (padding: 0)."""
        ids = model_inputs["input_ids"]
        mask = model_inputs.get("attention_mask")
        if mask is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(1, *ids.shape)
        return ((mask.long().cumsum(-1) - 1).clamp(min=0))[None]

    def _positions_from_p(self, model_inputs, P: list[Tensor], rewritten: dict) -> dict[str, Any]:
        """`position_ids` of the rewritten sequence: token j of image k at P_k[j] @ (positions
        of image k's tokens), text at its original position. Float32, differentiable w.r.t. P;
        [B, L] for 1-D RoPE, [D, B, L] otherwise."""
        ids = model_inputs["input_ids"]
        counts = self.placeholder_counts(model_inputs)
        orig = self._original_positions(model_inputs)  # (D, B, L_in)
        _, slots_in = rewrite_placeholders(
            model_inputs, self.image_token_id, counts, counts, pad_token_id=self._pad_token_id()
        )
        mask_in = model_inputs.get("attention_mask")
        mask_out = rewritten.get("attention_mask")
        ids_out = rewritten["input_ids"]
        rows = []
        for b in range(ids.shape[0]):
            valid = (
                torch.ones_like(ids[b], dtype=torch.bool) if mask_in is None else mask_in[b].bool()
            )
            starts = {s.start: k for k, s in enumerate(slots_in) if s.row == b}
            cols, j = [], 0
            while j < ids.shape[1]:
                if j in starts:
                    k = starts[j]
                    src = orig[:, b, j : j + counts[k]].to(ids_out.device, torch.float32)
                    p = P[k].to(ids_out.device, torch.float32)
                    cols.append(src @ p.T)  # (D, m_k)
                    j += counts[k]
                    continue
                if valid[j]:
                    cols.append(orig[:, b, j : j + 1].to(ids_out.device, torch.float32))
                j += 1
            row = torch.cat(cols, dim=1)  # (D, L_valid_out)
            full = row.new_zeros((row.shape[0], ids_out.shape[1]))
            if mask_out is None:
                full = full + row
            else:
                full = full.masked_scatter(mask_out[b].bool()[None], row)
            rows.append(full)
        pos = torch.stack(rows, dim=1)  # (D, B, L_out)
        return {"position_ids": pos[0] if pos.shape[0] == 1 else pos}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, positions={self.positions!r})"


def feature_layer_index(layer: int, num_layers: int, *, where: str) -> int:
    """Index of the encoder layer whose output is `hidden_states[layer]`.

    `hidden_states` holds the embeddings then every layer's output (num_layers + 1 entries), so
    `hidden_states[j + 1]` is layer j's output and `hidden_states[j]` its input.
    """
    idx = layer % (num_layers + 1) if layer < 0 else layer
    if not 1 <= idx <= num_layers:
        raise ValueError(f"{where}={layer} does not name an encoder layer's output")
    return idx - 1


def head_split(x: Tensor, heads: int) -> Tensor:
    """[..., N, H*dh] -> [..., H, N, dh]."""
    *lead, n, hd = x.shape
    return x.reshape(*lead, n, heads, hd // heads).transpose(-2, -3)


def scale_for(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _decoder_layers(model) -> tuple[Any, Any]:
    """(decoder, its layer ModuleList) of the LVLM's language model."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}'s decoder {type(decoder).__name__} has no `layers` ModuleList"
        )
    return decoder, layers


def _prompt_queries(model_inputs, image_token_id: int, slots: list[ImageSlot]) -> list[Tensor]:
    """Per image, the position of the last valid text token of its row, which must follow the
    image's placeholders (a [1] tensor): FastV ranks by that token's attention alone, the one
    that has read the whole prompt (the official implementation does the same)."""
    ids = model_inputs["input_ids"]
    mask = model_inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    text = valid & (ids != image_token_id)  # (B, L)
    queries = []
    for i, s in enumerate(slots):
        q = text[s.row].clone()
        q[: s.start + s.count] = False
        if not q.any():
            raise ValueError(f"image {i} (row {s.row}) has no prompt text after it")
        queries.append(q.nonzero().squeeze(1)[-1:])  # (1,)
    return queries


@contextlib.contextmanager
def _first_layers_eager(model, adapter: Adapter, layer: int) -> Iterator[None]:
    """For the block: the LLM runs layers 0..`layer` only, eager attention; all restored after
    (also on error), and the adapter's model state reset on both sides."""
    text_cfg = getattr(model.config, "text_config", model.config)
    decoder, layers = _decoder_layers(model)
    # Several configs may hold the depth (the text config, the decoder's own if distinct).
    configs = [text_cfg] if decoder.config is text_cfg else [text_cfg, decoder.config]
    depths = [c.num_hidden_layers for c in configs]
    previous = text_cfg._attn_implementation
    nested = text_cfg is not model.config
    adapter.reset_state()
    try:
        # Qwen2-VL's text model loops over every entry of `layers`, Llama/Qwen2 over
        # `layers[:num_hidden_layers]`: shortening both stops every family after layer K.
        decoder.layers = torch.nn.ModuleList(list(layers)[: layer + 1])
        for c in configs:
            c.num_hidden_layers = layer + 1
        model.set_attn_implementation({"text_config": "eager"} if nested else "eager")
        yield
    finally:
        model.set_attn_implementation({"text_config": previous} if nested else previous)
        for c, depth in zip(configs, depths, strict=True):
            c.num_hidden_layers = depth
        decoder.layers = layers
        adapter.reset_state()


def prompt_attention(
    model,
    adapter: Adapter,
    model_inputs,
    *,
    layer: int = 2,
    visual_tokens: list[Tensor] | None = None,
) -> list[Tensor]:
    """FastV scores: attention each visual token receives from the prompt after its image.

    Runs the uncompressed prefix (`model_inputs`: image(s), question, generation prompt) through
    LLM layers 0..`layer` only: for the call, this model instance's decoder `layers` ModuleList
    is cut to `layer + 1` entries, `num_hidden_layers` set to match and the LLM switched to eager
    attention (all three restored afterwards, also on error). A forward hook on layer `layer`'s
    attention reduces its weights as they are produced, so no other layer's map is kept: the
    weights of the prompt's last token (the one that has read the whole question; padding
    skipped) are averaged over heads, keeping that image's columns, as in FastV's own code.
    The vision tower is skipped when `visual_tokens` are given; the LM head only sees the last
    position.

    Args:
        model: the LVLM `adapter` wraps.
        adapter: `adapter_for(model)`.
        model_inputs: processor output for the prefix (batch of dialogues allowed).
        layer: LLM layer index K (0-based; FastV uses K = 2).
        visual_tokens: `adapter.visual_tokens(model_inputs)` when the caller already has them
            (one [n_i, d] tensor per image, uncompressed); computed here otherwise.

    Returns:
        One [n_i] float32 tensor per image, batch order.

    Raises:
        ValueError: `layer` out of range (the message names the LLM's depth), `visual_tokens`
            not matching the placeholders, or an image with no text after it.
    """
    _, layers = _decoder_layers(model)
    n_layers = len(layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(
            f"prompt_attention layer={layer!r} is out of range: the LLM has {n_layers} layers "
            f"(0..{n_layers - 1})"
        )
    counts = adapter.placeholder_counts(model_inputs)
    if visual_tokens is not None:
        adapter._check_tokens(visual_tokens, expect=len(counts))
        got = [int(t.shape[0]) for t in visual_tokens]
        if got != counts:
            raise ValueError(
                f"prompt_attention visual_tokens have {got} rows but the placeholders need "
                f"{counts} (pass the uncompressed adapter.visual_tokens output)"
            )
    # Identity rewrite: same layout, but it tells where each image's placeholders are.
    _, slots = rewrite_placeholders(
        model_inputs, adapter.image_token_id, counts, counts, pad_token_id=adapter._pad_token_id()
    )
    queries = _prompt_queries(model_inputs, adapter.image_token_id, slots)

    with torch.no_grad():
        # The same forward (P = I is exact) without the vision tower, so only the LLM runs.
        if visual_tokens is None:
            visual_tokens = adapter.visual_tokens(model_inputs)
        inputs = adapter.inputs_with(model_inputs, visual_tokens)

    scores: list[Tensor] = []

    def keep_scores(_module, _args, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"layer {layer}'s attention returned no weights under eager attention"
            )
        for s, q in zip(slots, queries, strict=True):
            rows = weights[s.row, :, q, s.start : s.start + s.count]  # (H, q_i, n_i)
            scores.append(rows.float().mean(dim=(0, 1)))  # (n_i,)

    with _first_layers_eager(model, adapter, layer):
        hook = layers[layer].self_attn.register_forward_hook(keep_scores)
        try:
            with torch.no_grad():
                model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
    if len(scores) != len(slots):
        raise RuntimeError(
            f"layer {layer}'s attention gave {len(scores)} scores for {len(slots)} images"
        )
    return scores
