"""The inference engine: dialogues in padded batches, visual tokens compressed once, the KV
cache reused turn after turn.

Turn 1 renders every dialogue's prompt, runs the processor on the whole batch (left padding),
compresses each image once (`compress_inputs`; m = ceil((1 - rate) n) tokens per image; FastV
ranks with each dialogue's own first prompt) and prefills one batched `DynamicCache`. Each later
turn feeds only the new text of every dialogue (the previous answer, the end of its turn and the
new question: the chat template's prefix property, docs/contracts.md), left-padded to the
longest: the padding stays in the cache as masked holes, and each row's positions count only its
valid tokens, so every row sees what it would see alone. Nothing inside the LLM is patched: the
compressed tokens enter through `mm_encoder_outputs`.

After each answer the cache is cropped back to the end of that turn's prompt and the answer is
re-fed as text with the next question. That costs a few tokens per turn and keeps the cache
exactly equal to a from-scratch encoding of the rendered dialogue, whatever the generated tokens
were (e.g. an answer cut at `max_new_tokens`). `Conversation` is this engine with one row.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from mc_core.compressors.ops import check_rate
from mc_core.data.images import as_rgb
from mc_core.inference.compress import compress_inputs
from mc_core.inference.dialogue import render, to_device
from mc_core.models.families import adapter_for
from mc_core.runtime import model_device

__all__ = ["BatchConversation", "DialogueState", "check_max_new_tokens", "greedy_answers"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_max_new_tokens(max_new_tokens) -> None:
    """A positive int, bools refused."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")


class DialogueState:
    """One dialogue of a `BatchConversation`: its turns so far, compression and cache record."""

    def __init__(self, images: list[Any], rate: float | None = None) -> None:
        self.images = as_rgb(images)
        self.rate = rate  # the row's compression rate; None: the compressor's own
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.visual_tokens: list[int] | None = None
        self.P: list[Tensor] | None = None
        self.tokens: list[Tensor] | None = None
        self.cache_tokens: list[int] = []
        self.prefill_s: list[float] = []
        self.first_logits: list[Tensor] = []
        self.text = ""  # rendered text the cache covers

    @property
    def turns(self) -> int:
        """Number of questions asked so far."""
        return len(self.questions)

    def set_answer(self, turn: int, answer: str) -> None:
        """Replace the recorded answer of `turn` (0-based), e.g. with the gold one.

        Only the last answered turn can change: earlier ones are already in the cache.
        """
        if turn != len(self.answers) - 1:
            raise ValueError(
                f"turn={turn}: only the last answered turn ({len(self.answers) - 1}) "
                "can be replaced"
            )
        self.answers[turn] = answer


def _uses_mrope(model) -> bool:
    # Qwen-style LVLMs compute 3-D M-RoPE positions (`get_rope_index`). `rope_deltas` alone is
    # no signal: `positions="source"` adapters give 1-D RoPE models one too.
    return hasattr(getattr(model, "model", None), "get_rope_index")


def _positions(mask: Tensor, start: Tensor) -> Tensor:
    """Position of each token of a left-padded chunk: `start` + valid tokens before it in the
    row (padding gets the row's next position; it is masked anyway)."""
    before = (mask.long().cumsum(-1) - mask.long()).to(start.dtype)  # (B, L)
    return start[:, None] + before


class BatchConversation:
    """Several dialogues in padded batches: `ask(list[str]) -> list[str]`, one question each
    (the cycle is the module docstring's; every row sees what it would alone, up to float
    summation order: tests/test_batching.py). M-RoPE models (Qwen) continue each row from its
    own offset (`rope_deltas` per row). Greedy decoding runs all rows together until each has
    hit EOS or `max_new_tokens`.

    Args:
        model, processor, compressor, adapter, max_new_tokens, instruction: as for
            `Conversation`.
        images: one entry per dialogue (a PIL image or a list of them).
        rates: one rate for every dialogue or one each (None: the compressor's own): an
            any-rate compressor serves rows of several rates in one batch, each as it would
            alone (`Compressor.forward`'s ``rate=``; ignored without a compressor).

    Attributes:
        rows: per dialogue, `rate`, `questions`, `answers`, `visual_tokens`, `P`, `tokens`,
            `cache_tokens` (valid tokens at each prompt's end), `first_logits` and
            `prefill_s` (the batch's prefill seconds divided by the batch size: amortised).
        batch_prefill_s: each turn's prefill seconds for the whole batch.
    """

    def __init__(
        self,
        model,
        processor,
        compressor=None,
        *,
        images: Sequence[Any],
        adapter=None,
        max_new_tokens: int = 4,
        instruction: str | None = None,
        rates: float | Sequence[float | None] | None = None,
    ) -> None:
        self.instruction = instruction
        if not images:
            raise ValueError("images is empty: a batch needs at least one dialogue")
        check_max_new_tokens(max_new_tokens)
        self.rows = _dialogues(images, _row_rates(rates, len(images)))
        self.model = model
        self.processor = processor
        self.compressor = compressor
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.max_new_tokens = max_new_tokens
        self.batch_prefill_s: list[float] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None  # (B, T) valid tokens of the cache
        self._next: Tensor | None = None  # (B,) next text position per row
        self._mrope = _uses_mrope(model)
        self._device = model_device(model)
        self._dtype = next(model.parameters()).dtype
        self._pad = int(self.adapter._pad_token_id())
        self._eos = _eos_ids(model, processor)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def ask(self, questions: Sequence[str]) -> list[str]:
        """One question per dialogue, in row order; returns the answers in the same order."""
        _check_questions(questions, len(self.rows))
        texts = []
        for row, q in zip(self.rows, questions, strict=True):
            row.questions.append(q)
            texts.append(
                render(
                    self.processor,
                    row.questions,
                    row.answers,
                    n_images=len(row.images),
                    instruction=self.instruction,
                )
            )
        _sync(self._device)
        t0 = time.perf_counter()
        first = self._cache is None
        logits = self._prefill_first(texts) if first else self._prefill_more(texts)
        _sync(self._device)
        seconds = time.perf_counter() - t0
        self.batch_prefill_s.append(seconds)
        prompt_len = self._cache.get_seq_length()
        valid = self._mask.sum(-1).tolist()
        for b, (row, text) in enumerate(zip(self.rows, texts, strict=True)):
            row.text = text
            row.cache_tokens.append(int(valid[b]))
            row.prefill_s.append(seconds / len(self.rows))
            row.first_logits.append(logits[b, -1].float().cpu())
        answers = self._decode(logits)
        # Drop the generated tokens: the next turn re-feeds the answers as rendered text.
        extra = self._cache.get_seq_length() - prompt_len
        if extra > 0:
            self._cache.crop(-extra)
        self._mask = self._mask[:, :prompt_len]
        for row, a in zip(self.rows, answers, strict=True):
            row.answers.append(a)
        return answers

    def _prefill_first(self, texts: list[str]) -> Tensor:
        inputs = self.processor(
            text=texts,
            images=[row.images for row in self.rows],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        inputs = to_device(dict(inputs), self._device, self._dtype)
        n_total = (inputs["input_ids"] == self.adapter.image_token_id).sum(-1).tolist()
        # FastV's layer-K pass runs on the padded batch with the model's default positions:
        # rotary attention only sees relative positions, which left padding does not shift.
        inputs, tokens, ps = compress_inputs(
            self.model, self.adapter, self.compressor, inputs, rate=_image_rates(self.rows)
        )
        _split_tokens(self.rows, tokens, ps, n_total)
        mask = inputs["attention_mask"]
        given = inputs.get("position_ids")
        plain = _plain_positions(inputs, self._mrope)
        if plain:
            # Counted from the mask, so later turns (with holes) continue each row exactly.
            pos = _positions(mask, torch.zeros_like(mask[:, 0]))
            inputs["position_ids"] = pos[None].expand(3, -1, -1) if self._mrope else pos
        self.adapter.reset_state()
        self._cache = DynamicCache(config=self.model.config)
        out = self.model(**inputs, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._next = _next_positions(self.model, mask, given, plain=plain, mrope=self._mrope)
        if not plain:
            self.adapter.reset_state()
        self._mask = mask
        return out.logits

    def _prefill_more(self, texts: list[str]) -> Tensor:
        chunks = []
        for row, text in zip(self.rows, texts, strict=True):
            if not text.startswith(row.text):
                raise ValueError(
                    "chat template lacks the prefix property: the new turn's rendering does "
                    f"not start with the previous one ({row.text[-40:]!r})"
                )
            new = text[len(row.text) :]
            chunks.append(self.processor.tokenizer(new, add_special_tokens=False)["input_ids"])
        ids, mask = _left_pad(chunks, self._pad, self._mask.dtype)
        return self._step(ids.to(self._device), mask.to(self._device))

    def _step(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Append a left-padded chunk `ids` [B, L] (valid where `mask`) to every row's cache."""
        pos = _positions(mask, self._next)
        if self._mrope:
            pos = pos[None].expand(3, -1, -1)
        self._mask = torch.cat([self._mask, mask], dim=1)
        self._next = self._next + mask.sum(-1).to(self._next.dtype)
        return self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=pos,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits

    def _decode(self, logits: Tensor) -> list[str]:
        B = len(self.rows)
        next_at_prompt = self._next.clone()
        tokens: list[list[int]] = [[] for _ in range(B)]
        active = [True] * B
        for _ in range(self.max_new_tokens):
            nxt = logits[:, -1].argmax(-1).tolist()
            for b in range(B):
                if not active[b]:
                    continue
                if nxt[b] in self._eos:
                    active[b] = False
                    continue
                tokens[b].append(nxt[b])
                if len(tokens[b]) == self.max_new_tokens:
                    active[b] = False
            if not any(active):
                break
            # Finished rows feed a masked pad: their caches only grow by a hole.
            ids = torch.tensor([[t if a else self._pad] for t, a in zip(nxt, active, strict=True)])
            mask = torch.tensor([[int(a)] for a in active], dtype=self._mask.dtype)
            logits = self._step(ids.to(self._device), mask.to(self._device))
        self._next = next_at_prompt
        decode = self.processor.tokenizer.decode
        return [decode(t, skip_special_tokens=True).strip() for t in tokens]

    def set_answers(self, answers: Sequence[str]) -> None:
        """Replace every row's last answer (gold history)."""
        if len(answers) != len(self.rows):
            raise ValueError(f"got {len(answers)} answers for {len(self.rows)} dialogues")
        for row, a in zip(self.rows, answers, strict=True):
            row.set_answer(row.turns - 1, a)

    @property
    def visual_tokens(self) -> list[list[int] | None]:
        """Visual tokens kept per image, per dialogue."""
        return [row.visual_tokens for row in self.rows]

    @property
    def prefill_s(self) -> list[list[float]]:
        """Per-turn prefill seconds per dialogue (amortised over the batch)."""
        return [row.prefill_s for row in self.rows]


def _row_rates(rates, n: int) -> list[float | None]:
    """`BatchConversation`'s ``rates`` as one checked rate (or None) per dialogue."""
    if rates is None or isinstance(rates, numbers.Real):
        rates = [rates] * n
    elif isinstance(rates, str) or not isinstance(rates, Sequence) or len(rates) != n:
        got = len(rates) if isinstance(rates, Sequence) and not isinstance(rates, str) else 1
        raise ValueError(f"rates={rates!r}: expected one rate or {n} (one per dialogue), got {got}")
    return [None if r is None else check_rate(r, where=f"rates[{i}]") for i, r in enumerate(rates)]


def _image_rates(rows: list[DialogueState]) -> list[float | None] | None:
    """Each image's rate, its dialogue's (batch order); None where every row has its own."""
    rates = [row.rate for row in rows for _ in row.images]
    return None if all(r is None for r in rates) else rates


def _dialogues(images: Sequence[Any], rates: list[float | None]) -> list[DialogueState]:
    rows = []
    for i, (img, rate) in enumerate(zip(images, rates, strict=True)):
        imgs = list(img) if isinstance(img, list | tuple) else [img]
        if not imgs:
            raise ValueError(f"images[{i}] is empty: a dialogue needs at least one image")
        rows.append(DialogueState(imgs, rate))
    return rows


def _eos_ids(model, processor) -> set[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {int(e) for e in [*eos, processor.tokenizer.eos_token_id] if e is not None}


def _check_questions(questions: Sequence[str], n: int) -> None:
    if isinstance(questions, str) or len(questions) != n:
        got = 1 if isinstance(questions, str) else len(questions)
        raise ValueError(f"got {got} questions for a batch of {n} dialogues")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"questions[{i}]={q!r}: expected a non-empty string")


def _split_tokens(rows: list[DialogueState], tokens, ps, n_total: list[int]) -> None:
    """Give each row its images' compressed tokens and P (batch order), or its token count."""
    start = 0
    for b, row in enumerate(rows):
        k = len(row.images)
        if tokens is None:
            row.visual_tokens = [int(n_total[b])]
        else:
            row.tokens = list(tokens[start : start + k])
            row.P = list(ps[start : start + k])
            row.visual_tokens = [int(t.shape[0]) for t in row.tokens]
        start += k


def _plain_positions(inputs: dict[str, Any], mrope: bool) -> bool:
    """Whether the engine counts the prefill's positions itself. Positions the adapter gave
    (`source` mode: each compressed token at its sources' place) are kept, and Qwen places the
    image tokens itself from their grid; Qwen with `packed` tokens has no grid left, so it gets
    plain 1-D positions as the other families do."""
    if mrope:
        return not ({"position_ids", "image_grid_thw"} & inputs.keys())
    return inputs.get("position_ids") is None


def _next_positions(
    model, mask: Tensor, given: Tensor | None, *, plain: bool, mrope: bool
) -> Tensor:
    """(B,) position of each row's next text token after the prefill: its valid tokens where
    the engine counted the positions (`plain`); Qwen: valid tokens + the row's offset, as the
    model keeps it (whether it placed the tokens from their grid or the adapter gave them);
    1-D `source` positions (`given`): after the last position used."""
    n_valid = mask.sum(-1)
    if plain:
        return n_valid
    if mrope:
        deltas = model.model.rope_deltas.reshape(-1)
        return n_valid.to(deltas.dtype) + deltas.to(n_valid.device)
    return given.float().masked_fill(~mask.bool(), float("-inf")).amax(-1) + 1


def _left_pad(chunks: list[list[int]], pad: int, mask_dtype) -> tuple[Tensor, Tensor]:
    """Token id lists as a left-padded [B, L] batch and its validity mask."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=mask_dtype)
    for b, c in enumerate(chunks):
        if c:
            ids[b, width - len(c) :] = torch.tensor(c, dtype=torch.long)
            mask[b, width - len(c) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_answers(
    model,
    processor,
    images: Sequence[Any],
    questions: Sequence[Sequence[str]],
    *,
    max_new_tokens: int = 16,
    instruction: str | None = None,
    adapter=None,
    batch_size: int = 16,
) -> list[list[str]]:
    """The model's own greedy answers to every turn of every dialogue, with all visual tokens.

    Turn after turn each dialogue sees its own earlier answers (what the model would have said),
    so teacher forcing on the result reproduces the prompts the answers were generated from.

    Args:
        model, processor, adapter, instruction: as for `BatchConversation`.
        images: one entry per dialogue (a PIL image or a list).
        questions: the questions of each dialogue (all dialogues of a batch as many turns).
        max_new_tokens: answer length limit per turn (generation stops earlier at EOS /
            end of turn).
        batch_size: dialogues per `BatchConversation`.

    Returns:
        Per dialogue, one answer per question (special tokens removed, stripped).
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} image entries for {len(questions)} dialogues")
    out: list[list[str]] = []
    for start in range(0, len(images), batch_size):
        qs = [list(q) for q in questions[start : start + batch_size]]
        turns = {len(q) for q in qs}
        if len(turns) != 1:
            raise ValueError(f"dialogues {start}+ have different turn counts {sorted(turns)}")
        conv = BatchConversation(
            model,
            processor,
            None,
            images=list(images[start : start + batch_size]),
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            instruction=instruction,
        )
        for k in range(turns.pop()):
            conv.ask([q[k] for q in qs])
        out += [list(row.answers) for row in conv.rows]
    return out
