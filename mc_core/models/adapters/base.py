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

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from mc_core.compressors.base import CONTEXT_FIELDS
from mc_core.models.adapters.placeholders import ImageSlot, rewrite_placeholders
from mc_core.models.adapters.positions import (
    install_position_hook,
    original_positions,
    positions_from_p,
)

if TYPE_CHECKING:
    from mc_core.compressors import TokenContext

__all__ = ["POSITIONS", "Adapter"]

POSITIONS = ("packed", "source")  # see Adapter; mirrored by mc_core.models.families.POSITIONS


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

    def _original_positions(self, model_inputs) -> Tensor:
        """[D, B, L] positions of the uncompressed input (1-D RoPE here; M-RoPE families
        override it)."""
        return original_positions(model_inputs)

    def _install_position_hook(self) -> None:
        """Continue cached forwards after explicit positions (1-D RoPE; M-RoPE families
        override it)."""
        install_position_hook(self.model)

    # -- what subclasses provide ------------------------------------------------------------
    def visual_tokens(self, model_inputs) -> list[Tensor]:
        """Projector output per image: list of [n_i, d], batch order."""
        raise NotImplementedError

    def contexts(self, model_inputs, need: frozenset[str] = frozenset()) -> list[TokenContext]:
        """TokenContext per image: positions (and grid when exact) always; `cls_attention` and
        `keys` when named in `need`. The prompt's fields (`PROMPT_FIELDS`) in `need` are accepted
        and left empty: `mc_core.inference.compress.compress_inputs` fills them."""
        raise NotImplementedError

    @staticmethod
    def _check_need(need) -> frozenset[str]:
        need = frozenset(need)
        unknown = need - CONTEXT_FIELDS
        if unknown:
            raise ValueError(
                f"contexts need={sorted(unknown)} unknown; fields are {sorted(CONTEXT_FIELDS)}"
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
            out.update(
                positions_from_p(
                    model_inputs,
                    P,
                    rewritten,
                    self._original_positions(model_inputs),
                    image_token_id=self.image_token_id,
                    counts=counts_in,
                    pad_token_id=self._pad_token_id(),
                )
            )
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, positions={self.positions!r})"
