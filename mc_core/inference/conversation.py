"""One multi-turn dialogue: compress the visual tokens once, reuse the KV cache turn after turn.

`Conversation` is the inference engine (`mc_core.inference.engine.BatchConversation`) with a
single row: the same prefill, cache reuse and greedy decoding serve one dialogue and a batch.

Example:
    >>> conv = Conversation(model, processor, build("metacompress", rate=0.9, dim=d),
    ...                     images=[image])
    >>> conv.ask("what colour is at row 1 col 2 ?")
    'red'
    >>> conv.ask("how many blue ?")
    '2'
"""

from __future__ import annotations

import torch

from mc_core.data.images import as_rgb
from mc_core.inference.engine import BatchConversation

__all__ = ["Conversation"]


def _row(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._row, name), doc=doc)


def _engine(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._batch, name), doc=doc)


class Conversation:
    """One dialogue on one set of images: compress once, then `ask` turn after turn.

    Args:
        model: the LVLM (used as is: eval mode, no gradients).
        processor: its processor (chat template with the prefix property).
        compressor: a compressor from `mc_core.compressors.build` (or trained), None = all
            visual tokens.
        images: the image(s) of the first turn (a PIL image or a list).
        adapter: the family adapter (default `mc_core.models.families.adapter_for(model)`).
        max_new_tokens: answer length limit per turn (greedy decoding).
        instruction: appended to every question (None: the short-answer instruction of
            `mc_core.inference.dialogue.default_instruction` for real tokenizers, none for the
            synthetic world).
        rate: compress the images at this rate instead of the compressor's own (an any-rate
            compressor serves each conversation at its own rate; ignored without one).
    """

    def __init__(
        self,
        model,
        processor,
        compressor=None,
        *,
        images,
        adapter=None,
        max_new_tokens: int = 4,
        instruction: str | None = None,
        rate: float | None = None,
    ) -> None:
        images = as_rgb(images)
        if not images:
            raise ValueError("images is empty: a conversation needs at least one image")
        self._batch = BatchConversation(
            model,
            processor,
            compressor,
            images=[images],
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            instruction=instruction,
            rates=rate,
        )
        self._row = self._batch.rows[0]

    model = _engine("model", "The LVLM.")
    processor = _engine("processor", "Its processor.")
    compressor = _engine("compressor", "The compressor (None: all visual tokens).")
    adapter = _engine("adapter", "The family adapter.")
    max_new_tokens = _engine("max_new_tokens", "Answer length limit per turn.")
    instruction = _engine("instruction", "Appended to every question.")

    images = _row("images", "The dialogue's images (RGB).")
    rate = _row("rate", "The rate the images are compressed at (None: the compressor's own).")
    questions = _row("questions", "Questions asked so far.")
    answers = _row("answers", "The model's answers (unless replaced with `set_answer`).")
    visual_tokens = _row(
        "visual_tokens",
        "Visual tokens kept per image (m_i), set by the first turn (without a compressor: one "
        "entry, all the image placeholders).",
    )
    P = _row("P", "The compression matrices per image (None without a compressor).")
    tokens = _row("tokens", "The compressed visual tokens per image, [m_i, d] (None without).")
    cache_tokens = _row("cache_tokens", "Tokens in the KV cache at each turn's prompt end.")
    prefill_s = _row(
        "prefill_s",
        "Seconds of each turn's prefill (turn 1: processor, vision tower, compression and LLM "
        "prefill; later turns: the new text only).",
    )
    first_logits = _row(
        "first_logits", "Each turn's next-token logits [V] (float32, CPU) at its prompt's end."
    )
    text = _row("text", "The rendered dialogue the KV cache covers (the last prompt).")

    @property
    def turns(self) -> int:
        """Number of questions asked so far."""
        return self._row.turns

    def set_answer(self, turn: int, answer: str) -> None:
        """Replace the recorded answer of `turn` (0-based), e.g. with the gold one.

        Only the last answered turn can change: earlier ones are already in the cache.
        """
        self._row.set_answer(turn, answer)

    @torch.no_grad()
    def ask(self, question: str) -> str:
        """Ask the next question; returns the model's greedy answer (special tokens removed)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question={question!r}: expected a non-empty string")
        return self._batch.ask([question])[0]
