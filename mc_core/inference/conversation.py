"""Multi-turn inference: compress the visual tokens once, reuse the KV cache turn after turn.

Turn 1 encodes the image(s) and the first question, takes the projector output per image
(`adapter.visual_tokens`), compresses it (`P @ X`, m = ceil((1 - rate) n) tokens) and prefills
the LLM into a `DynamicCache`. Each later turn feeds only the new text: the previous answer, the
end of its turn and the new question (the chat template's prefix property, docs/contracts.md).
Nothing inside the LLM is patched: the compressed tokens enter through `mm_encoder_outputs`.

After each answer the cache is cropped back to the end of that turn's prompt and the answer is
re-fed as text with the next question. That costs a few tokens per turn and keeps the cache
exactly equal to a from-scratch encoding of the rendered dialogue, whatever the generated
tokens were (e.g. an answer cut at `max_new_tokens`).

Example:
    >>> conv = Conversation(model, processor, build("metacompress", rate=0.9, dim=d),
    ...                     images=[image])
    >>> conv.ask("what colour is at row 1 col 2 ?")
    'red'
    >>> conv.ask("how many blue ?")
    '2'
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from mc_core.data.images import as_rgb
from mc_core.inference.dialogue import render, to_device
from mc_core.models.adapters import prompt_attention
from mc_core.models.families import adapter_for

__all__ = [
    "BatchConversation",
    "Conversation",
    "compress_inputs",
    "greedy_answers",
    "model_device",
    "reset_state",
    "token_dim",
]


def model_device(model) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def reset_state(adapter) -> None:
    """Forget state the model keeps between calls (Qwen's M-RoPE `rope_deltas`) before an
    unrelated forward; adapters without such state need nothing."""
    reset = getattr(adapter, "reset_state", None)
    if callable(reset):
        reset()
    inner = getattr(getattr(adapter, "model", None), "model", None)
    if inner is not None and getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None


def token_dim(model) -> int:
    """Width d of the visual tokens the compressors see (the LLM hidden size)."""
    return int(model.config.get_text_config().hidden_size)


def _model_state(model) -> dict[str, Any]:
    # Qwen's M-RoPE offsets of the dialogue just prefilled: later cached forwards of this
    # dialogue need them, and other dialogues (BatchConversation rows) overwrite them.
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        return {"rope_deltas": inner.rope_deltas}
    return {}


def _restore_state(model, state: dict[str, Any]) -> None:
    inner = getattr(model, "model", None)
    for key, value in state.items():
        setattr(inner, key, value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compress_inputs(
    model,
    adapter,
    compressor,
    model_inputs: dict[str, Any],
    *,
    fastv_layer: int | None = None,
) -> tuple[dict[str, Any], list[Tensor] | None, list[Tensor] | None]:
    """Model inputs with each image's visual tokens replaced by the compressor's output.

    Args:
        model: the LVLM (frozen).
        adapter: its family adapter.
        compressor: a `mc_core.compressors.Compressor`, or None for the untouched inputs.
        model_inputs: processor output for a prompt holding all the images (for a
            prompt-dependent method such as fastv: the first turn's prompt).
        fastv_layer: LLM layer K whose attention ranks tokens for prompt-dependent methods
            (default: the compressor's `layer` attribute, else FastV's K = 2, capped at the
            LLM's last layer so shallow test models can run it).

    Returns:
        `(inputs, tokens, P)`: the inputs `model(**inputs)` accepts, the compressed tokens
        `[m_i, d]` per image (model dtype) and `P [m_i, n_i]` per image; both None without a
        compressor.
    """
    if compressor is None:
        return dict(model_inputs), None, None
    tokens = adapter.visual_tokens(model_inputs)  # list of (n_i, d)
    # prompt_attention is not a vision-side field: it comes from an LLM pass below.
    need = frozenset(compressor.needs) - {"prompt_attention"}
    contexts = adapter.contexts(model_inputs, need=need)
    if "prompt_attention" in compressor.needs:
        layer = fastv_layer
        if layer is None:
            n_layers = int(model.config.get_text_config().num_hidden_layers)
            layer = min(int(getattr(compressor, "layer", 2)), n_layers - 1)
        scores = prompt_attention(model, adapter, model_inputs, layer=layer, visual_tokens=tokens)
        for ctx, s in zip(contexts, scores, strict=True):
            ctx.prompt_attention = s
    # Compressors run in float32 (the trained generator's dtype); the model's dtype after.
    dtype = tokens[0].dtype
    ys, ps = compressor([t.float() for t in tokens], contexts)
    ys = [y.to(dtype) for y in ys]
    return adapter.inputs_with(model_inputs, ys, P=list(ps)), ys, list(ps)


def _check_max_new_tokens(max_new_tokens) -> None:
    """Shared by `Conversation` and `BatchConversation`: a positive int, bools refused."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")


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
        instruction: appended to every question (None:
        `mc_core.inference.dialogue.default_instruction`,
            the short-answer instruction for real tokenizers, none for the synthetic world).

    Attributes:
        questions, answers: the dialogue so far (answers = the model's own, unless replaced
            with `set_answer`).
        visual_tokens: visual tokens kept per image (m_i), set by the first turn (without a
            compressor: one entry, all the image placeholders).
        P: the compression matrices per image (None without a compressor).
        tokens: the compressed visual tokens per image, `[m_i, d]` (None without one).
        cache_tokens: tokens in the KV cache at the end of each turn's prompt.
        prefill_s: seconds of each turn's prefill (turn 1: vision tower, compression and LLM
            prefill; later turns: the new text only).
        first_logits: each turn's next-token logits `[V]` (float32, CPU) at its prompt's end.
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
    ) -> None:
        _check_max_new_tokens(max_new_tokens)
        self.instruction = instruction
        self.model = model
        self.processor = processor
        self.compressor = compressor
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.images = as_rgb(images)
        if not self.images:
            raise ValueError("images is empty: a conversation needs at least one image")
        self.max_new_tokens = max_new_tokens
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.visual_tokens: list[int] | None = None
        self.P: list[Tensor] | None = None
        self.tokens: list[Tensor] | None = None
        self.cache_tokens: list[int] = []
        self.prefill_s: list[float] = []
        self.first_logits: list[Tensor] = []
        self._cache: DynamicCache | None = None
        self._state: dict[str, Any] = {}  # the model's per-dialogue state after turn 1
        self._text = ""  # rendered text the cache covers (the last prompt)
        self._cache_len = 0  # tokens in the cache for `_text`
        self._device = model_device(model)
        self._dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos = {int(e) for e in [*eos, processor.tokenizer.eos_token_id] if e is not None}

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

    @torch.no_grad()
    def ask(self, question: str) -> str:
        """Ask the next question; returns the model's greedy answer (special tokens removed)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question={question!r}: expected a non-empty string")
        self.questions.append(question)
        text = render(
            self.processor,
            self.questions,
            self.answers,
            n_images=len(self.images),
            instruction=self.instruction,
        )
        first = self._cache is None
        logits = self._prefill_first(text) if first else self._prefill_more(text)
        self._text = text
        self._cache_len = self._cache.get_seq_length()
        self.cache_tokens.append(self._cache_len)
        self.first_logits.append(logits[0, -1].float().cpu())
        answer = self._decode(logits)
        # Drop the generated tokens: the next turn re-feeds the answer as rendered text.
        extra = self._cache.get_seq_length() - self._cache_len
        if extra > 0:
            self._cache.crop(-extra)  # transformers 5: a negative count removes tokens
        self.answers.append(answer)
        return answer

    def _prefill_first(self, text: str) -> Tensor:
        inputs = self.processor(text=[text], images=self.images, return_tensors="pt")
        inputs = to_device(dict(inputs), self._device, self._dtype)
        _sync(self._device)
        t0 = time.perf_counter()
        n_total = int((inputs["input_ids"] == self.adapter.image_token_id).sum())
        inputs, self.tokens, self.P = compress_inputs(
            self.model, self.adapter, self.compressor, inputs
        )
        self.visual_tokens = (
            [n_total] if self.tokens is None else [int(t.shape[0]) for t in self.tokens]
        )
        reset_state(self.adapter)
        self._cache = DynamicCache(config=self.model.config)
        out = self.model(**inputs, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._state = _model_state(self.model)
        _sync(self._device)
        self.prefill_s.append(time.perf_counter() - t0)
        return out.logits

    def _prefill_more(self, text: str) -> Tensor:
        if not text.startswith(self._text):
            raise ValueError(
                "chat template lacks the prefix property: the new turn's rendering does not "
                f"start with the previous one ({self._text[-40:]!r})"
            )
        ids = self.processor.tokenizer(text[len(self._text) :], add_special_tokens=False)
        ids = torch.tensor([ids["input_ids"]], dtype=torch.long, device=self._device)
        _restore_state(self.model, self._state)
        _sync(self._device)
        t0 = time.perf_counter()
        out = self.model(
            input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1
        )
        _sync(self._device)
        self.prefill_s.append(time.perf_counter() - t0)
        return out.logits

    def _decode(self, logits: Tensor) -> str:
        _restore_state(self.model, self._state)
        tokens: list[int] = []
        for _ in range(self.max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in self._eos:
                break
            tokens.append(nxt)
            if len(tokens) == self.max_new_tokens:
                break
            ids = torch.tensor([[nxt]], dtype=torch.long, device=self._device)
            logits = self.model(
                input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1
            ).logits
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class _Dialogue:
    """One row of a `BatchConversation`: the per-dialogue record `Conversation` keeps too."""

    def __init__(self, images: list[Any]) -> None:
        self.images = as_rgb(images)
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
        return len(self.questions)

    def set_answer(self, turn: int, answer: str) -> None:
        """As `Conversation.set_answer`: only the last answered turn can change."""
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
    """Several dialogues in padded batches: `ask(list[str]) -> list[str]`, one question each.

    Turn 1 renders every dialogue's prompt, runs the processor on the whole batch (left
    padding), compresses each image once (`compress_inputs`; FastV ranks with each dialogue's
    own first prompt) and prefills one batched `DynamicCache`. Each later turn appends every
    dialogue's new text, left-padded to the longest: the padding stays in the cache as masked
    holes, and each row's positions count only its valid tokens, so every row sees what its
    own `Conversation` would (same logits up to float summation order; tests/test_batching.py).
    M-RoPE models (Qwen) continue each row from its own offset (`rope_deltas` per row).
    Greedy decoding runs all rows together until each has hit EOS or `max_new_tokens`; the
    generated tokens are then cropped and re-fed as text with the next question, as in
    `Conversation`.

    Args:
        model, processor, compressor, adapter, max_new_tokens, instruction: as for
            `Conversation`.
        images: one entry per dialogue (a PIL image or a list of them).

    Attributes:
        rows: per dialogue, `questions`, `answers`, `visual_tokens`, `P`, `tokens`,
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
    ) -> None:
        self.instruction = instruction
        if not images:
            raise ValueError("images is empty: a batch needs at least one dialogue")
        _check_max_new_tokens(max_new_tokens)
        self.model = model
        self.processor = processor
        self.compressor = compressor
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.max_new_tokens = max_new_tokens
        self.rows: list[_Dialogue] = []
        for i, img in enumerate(images):
            imgs = list(img) if isinstance(img, list | tuple) else [img]
            if not imgs:
                raise ValueError(f"images[{i}] is empty: a dialogue needs at least one image")
            self.rows.append(_Dialogue(imgs))
        self.batch_prefill_s: list[float] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None  # (B, T) valid tokens of the cache
        self._next: Tensor | None = None  # (B,) next text position per row
        self._mrope = _uses_mrope(model)
        self._device = model_device(model)
        self._dtype = next(model.parameters()).dtype
        self._pad = int(self.adapter._pad_token_id())
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos = {int(e) for e in [*eos, processor.tokenizer.eos_token_id] if e is not None}

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def ask(self, questions: Sequence[str]) -> list[str]:
        """One question per dialogue, in row order; returns the answers in the same order."""
        if isinstance(questions, str) or len(questions) != len(self.rows):
            got = 1 if isinstance(questions, str) else len(questions)
            raise ValueError(f"got {got} questions for a batch of {len(self.rows)} dialogues")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"questions[{i}]={q!r}: expected a non-empty string")
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
        inputs, tokens, ps = compress_inputs(self.model, self.adapter, self.compressor, inputs)
        self._split_tokens(tokens, ps, n_total)
        mask = inputs["attention_mask"]
        # Positions the adapter gave (`source` mode: each compressed token at its sources'
        # place) are kept. Otherwise they are counted here, except where Qwen places the image
        # tokens itself from their grid; Qwen with `packed` tokens has no grid left, so it gets
        # plain 1-D positions as the other families do.
        given = inputs.get("position_ids")
        if self._mrope:
            plain = not ({"position_ids", "image_grid_thw"} & inputs.keys())
        else:
            plain = given is None
        if plain:
            # Counted from the mask, so later turns (with holes) continue each row exactly.
            pos = _positions(mask, torch.zeros_like(mask[:, 0]))
            inputs["position_ids"] = pos[None].expand(3, -1, -1) if self._mrope else pos
        reset_state(self.adapter)
        self._cache = DynamicCache(config=self.model.config)
        out = self.model(**inputs, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        n_valid = mask.sum(-1)
        if plain:
            self._next = n_valid
        elif self._mrope:
            # Qwen: next text position = valid tokens + this row's offset (as in the model).
            deltas = self.model.model.rope_deltas.reshape(-1)
            self._next = n_valid.to(deltas.dtype) + deltas.to(n_valid.device)
            reset_state(self.adapter)
        else:
            # 1-D `source` positions: the next text continues after the last position used.
            top = given.float().masked_fill(~mask.bool(), float("-inf")).amax(-1)
            self._next = top + 1
            reset_state(self.adapter)
        self._mask = mask
        return out.logits

    def _split_tokens(self, tokens, ps, n_total: list[int]) -> None:
        start = 0
        for b, row in enumerate(self.rows):
            k = len(row.images)
            if tokens is None:
                row.visual_tokens = [int(n_total[b])]
            else:
                row.tokens = list(tokens[start : start + k])
                row.P = list(ps[start : start + k])
                row.visual_tokens = [int(t.shape[0]) for t in row.tokens]
            start += k

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
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=self._mask.dtype)
        for b, c in enumerate(chunks):
            if c:
                ids[b, width - len(c) :] = torch.tensor(c, dtype=torch.long)
                mask[b, width - len(c) :] = 1
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
