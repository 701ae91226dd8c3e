"""Multi-turn dialogues on compressed embeddings through vLLM's offline engine (`LLM.generate`).

Each turn renders the whole dialogue with the model's chat template (the image in the first
user turn) and generates greedily; vLLM's prefix caching reuses the earlier turns' KV cache, so
a later turn costs its new text only. Several dialogues advance together, one `generate` call
per turn.

`LLM(...)` spawns workers: build it under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mc_core.inference.embeds import ImageEmbeds
from mc_vllm.inputs import chat_messages, multi_modal_data

__all__ = ["OfflineChat", "Turn", "engine_kwargs"]


def engine_kwargs(model: str, **overrides: Any) -> dict[str, Any]:
    """`vllm.LLM` arguments for a model fed image embeddings (one image per prompt).

    fp32 by default: greedy tokens then equal the transformers reference (bf16 may flip ties).
    """
    kwargs: dict[str, Any] = dict(
        model=model,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 1},
        dtype="float32",
        enable_prefix_caching=True,
    )
    kwargs.update(overrides)
    return kwargs


@dataclass
class Turn:
    """One answered turn: the text, its token ids, the prompt's length in tokens and the
    log-probabilities of the top first tokens (token id -> log-prob)."""

    answer: str
    token_ids: list[int]
    prompt_tokens: int
    first_logprobs: dict[int, float] = field(default_factory=dict)


@dataclass
class _Dialogue:
    emb: ImageEmbeds
    questions: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


class OfflineChat:
    """Dialogues on precomputed image embeddings, advanced turn by turn together.

    Args:
        llm: a `vllm.LLM` built with `engine_kwargs` (``enable_mm_embeds=True``).
        embeds: one `ImageEmbeds` per dialogue.
        max_tokens: answer length limit per turn (greedy).
        logprobs: how many top first-token log-probabilities each turn records.
    """

    def __init__(
        self, llm, embeds: list[ImageEmbeds], *, max_tokens: int = 4, logprobs: int = 5
    ) -> None:
        from vllm import SamplingParams

        if not embeds:
            raise ValueError("embeds is empty: give one ImageEmbeds per dialogue")
        self.llm = llm
        self.rows = [_Dialogue(e) for e in embeds]
        self._tokenizer = llm.get_tokenizer()
        self._params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, skip_special_tokens=True
        )

    def prompt(self, row: int) -> str:
        """The rendered chat text of dialogue `row` (ends with the generation prompt)."""
        d = self.rows[row]
        answers = [t.answer for t in d.turns]
        return self._tokenizer.apply_chat_template(
            chat_messages(d.questions, answers), add_generation_prompt=True, tokenize=False
        )

    def ask(self, questions: list[str]) -> list[str]:
        """One question per dialogue; returns the greedy answers (special tokens removed)."""
        if len(questions) != len(self.rows):
            raise ValueError(f"got {len(questions)} questions for {len(self.rows)} dialogues")
        prompts = []
        for i, (d, q) in enumerate(zip(self.rows, questions, strict=True)):
            d.questions.append(q)
            # Every turn's prompt holds the image again: prefix caching skips its recompute.
            prompts.append({"prompt": self.prompt(i), "multi_modal_data": multi_modal_data(d.emb)})
        outs = self.llm.generate(prompts, self._params, use_tqdm=False)
        answers = []
        for d, out in zip(self.rows, outs, strict=True):
            gen = out.outputs[0]
            first = {}
            if gen.logprobs:
                first = {int(t): float(lp.logprob) for t, lp in gen.logprobs[0].items()}
            turn = Turn(
                answer=gen.text.strip(),
                token_ids=list(gen.token_ids),
                prompt_tokens=len(out.prompt_token_ids),
                first_logprobs=first,
            )
            d.turns.append(turn)
            answers.append(turn.answer)
        return answers
