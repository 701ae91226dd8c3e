"""Dialogues as model inputs: chat rendering, teacher forcing over all turns, batch collation.

A dialogue is rendered with the processor's own chat template (docs/contracts.md): the image(s)
in the first user turn, every later turn text only. The template has the prefix property: the
rendering of turns 1..k (with the generation prompt) is a prefix of turns 1..k+1. Teacher
forcing uses it to find each answer inside the one-pass encoding of the whole gold dialogue;
`mc_core.inference.conversation` uses it to feed only the new text of each turn.

Positions returned here are *logit* positions: `answer_positions[t]` is the index `i` whose
next-token logits (`logits[:, i]`) predict answer token `t` (at `i + 1`). They can be passed to
the model as `logits_to_keep` so only those rows of the LM head are computed.

Instruction: every question may carry a fixed instruction after a newline, as LLaVA's GQA / VQAv2
evaluation appends `SHORT_ANSWER` ("q\nAnswer the question using a single word or phrase.").
`instruction=None` (the default everywhere: `render`, `encode_dialogue`, `Conversation`,
`BatchConversation`, `evaluate`, the target cache) means `default_instruction(processor)`:
none for the library's word-level processors (the synthetic world's tiny teachers were trained
on bare questions), `SHORT_ANSWER` for any other (real) tokenizer. Training targets and
evaluation render through here, so both always see the same prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SHORT_ANSWER",
    "answer_token_ids",
    "collate",
    "default_instruction",
    "encode_dialogue",
    "messages",
    "render",
    "to_device",
]

# Keys whose tensors run along the token sequence ([B, L]) and the value each is padded with.
_SEQUENCE_PAD = {"attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}

SHORT_ANSWER = "Answer the question using a single word or phrase."


def default_instruction(processor) -> str:
    """The instruction real models get by default: `SHORT_ANSWER`, except for word-level
    tokenizers (`mc_core.models.processing`, the synthetic world), whose prompts stay bare."""
    from tokenizers import models

    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or isinstance(backend.model, models.WordLevel):
        return ""
    return SHORT_ANSWER


def _instruction(processor, instruction: str | None) -> str:
    if instruction is None:
        return default_instruction(processor)
    if not isinstance(instruction, str):
        raise ValueError(f"instruction={instruction!r}: expected a string or None (default)")
    return instruction


def messages(
    questions: Sequence[str], answers: Sequence[str], *, n_images: int = 1, instruction: str = ""
) -> list[dict]:
    """Chat messages for a dialogue: `len(questions)` user turns, `len(answers)` answers.

    Args:
        questions: the user turns, in order.
        answers: the assistant answers given so far (as many as `questions`, or one fewer when
            the last question is still open).
        n_images: image placeholders put in the first user turn.
        instruction: appended to every question after a newline ("" = none).

    Raises:
        ValueError: the counts do not fit, or a turn is not a string.
    """
    if len(answers) not in (len(questions), len(questions) - 1) or not questions:
        raise ValueError(
            f"dialogue has {len(questions)} questions and {len(answers)} answers: expected as "
            "many answers as questions, or one fewer"
        )
    out: list[dict] = []
    for k, q in enumerate(questions):
        if not isinstance(q, str):
            raise ValueError(f"questions[{k}]={q!r} is not a string")
        content: list[dict[str, Any]] = [{"type": "image"}] * (n_images if k == 0 else 0)
        text = f"{q}\n{instruction}" if instruction else q
        out.append({"role": "user", "content": [*content, {"type": "text", "text": text}]})
        if k < len(answers):
            if not isinstance(answers[k], str):
                raise ValueError(f"answers[{k}]={answers[k]!r} is not a string")
            out.append({"role": "assistant", "content": [{"type": "text", "text": answers[k]}]})
    return out


def render(
    processor,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    n_images: int = 1,
    instruction: str | None = None,
) -> str:
    """The chat text of a dialogue; ends with the generation prompt when a question is open.

    `instruction`: appended to every question (None: `default_instruction(processor)`)."""
    open_question = len(answers) < len(questions)
    instruction = _instruction(processor, instruction)
    return processor.apply_chat_template(
        messages(questions, answers, n_images=n_images, instruction=instruction),
        add_generation_prompt=open_question,
        tokenize=False,
    )


def _n_tokens(processor, text: str) -> int:
    # The processor tokenizes with the tokenizer's defaults; count the same way.
    return len(processor.tokenizer(text)["input_ids"])


def _answer_tokens(processor, prompt: str, done: str, answer: str) -> int:
    """How many tokens the answer takes inside the rendered turn.

    Counted in context: a byte-level BPE tokenizer splits " red" (after "ASSISTANT:") unlike
    "red" alone, so the answer is tokenized as the template places it (prompt + what the turn
    writes up to the answer's end; pre-tokenizers split at the space or special token that
    follows, so this is a prefix of the full encoding). Templates that do not write the answer
    verbatim fall back to tokenizing it alone.
    """
    tail = done[len(prompt) :]
    at = tail.find(answer) if answer else -1
    if at < 0:
        return len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    return _n_tokens(processor, prompt + tail[: at + len(answer)]) - _n_tokens(processor, prompt)


def answer_token_ids(model_inputs: Mapping[str, Any], answer_positions: Tensor) -> Tensor:
    """The gold answer tokens `[T]` that the logits at `answer_positions` predict (row 0)."""
    return model_inputs["input_ids"][0, answer_positions + 1]


def encode_dialogue(
    processor,
    images: Sequence[Any],
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    include_end: bool = True,
    instruction: str | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Encode a whole gold dialogue for teacher forcing in one pass.

    Args:
        processor: the family's processor (chat template with the prefix property).
        images: the dialogue's image(s) (PIL), placed in the first user turn.
        questions: the user turns.
        answers: the gold answers, one per question.
        include_end: also supervise the end-of-turn token that closes each answer (what makes
            generation stop), not only the answer words; templates that write none after an
            answer (llava-hf's) supervise the words only.
        instruction: appended to every question (None: `default_instruction(processor)`).

    Returns:
        `(model_inputs, answer_positions)`: the processor's output for the full dialogue (batch
        of one) and the logit positions `[T]` (long, ascending) predicting every answer token of
        every turn.

    Raises:
        ValueError: counts do not fit, the template lacks the prefix property, or an answer is
            empty after tokenization.
    """
    images = list(images)
    if len(answers) != len(questions):
        raise ValueError(
            f"teacher forcing needs one answer per question: got {len(questions)} questions, "
            f"{len(answers)} answers"
        )
    instruction = _instruction(processor, instruction)
    full_text = render(processor, questions, answers, n_images=len(images), instruction=instruction)
    inputs = dict(processor(text=[full_text], images=images, return_tensors="pt"))
    ids = inputs["input_ids"][0]
    # The image placeholders expand inside the processor; every prefix contains the image, so
    # text-token counts shift by one constant.
    offset = len(ids) - _n_tokens(processor, full_text)
    end_ids = {processor.tokenizer.eos_token_id}
    n = len(images)
    positions: list[int] = []
    for k in range(len(questions)):
        prompt = render(
            processor, questions[: k + 1], answers[:k], n_images=n, instruction=instruction
        )
        done = render(
            processor, questions[: k + 1], answers[: k + 1], n_images=n, instruction=instruction
        )
        if not full_text.startswith(prompt) or not done.startswith(prompt):
            raise ValueError(
                "chat template lacks the prefix property: the prompt of turn "
                f"{k + 1} is not a prefix of the full dialogue ({prompt!r})"
            )
        start = _n_tokens(processor, prompt) + offset
        stop = _n_tokens(processor, done) + offset
        span = list(range(start, stop))
        n_words = _answer_tokens(processor, prompt, done, answers[k])
        if n_words == 0:
            raise ValueError(f"answers[{k}]={answers[k]!r} tokenizes to nothing")
        keep = span[:n_words]
        if include_end:
            # The first end-of-turn token after the words (templates may add "\n" after it).
            ends = [i for i in span[n_words:] if int(ids[i]) in end_ids]
            keep += ends[:1]
        positions += [i - 1 for i in keep]
    return inputs, torch.tensor(positions, dtype=torch.long)


def to_device(
    inputs: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Move every tensor of a model-input dict (and of `mm_encoder_outputs`) to `device`.

    With `dtype`, floating-point inputs (pixels) are cast too: a bf16 model's vision tower
    does not take float32 pixels in every family.
    """
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            cast = dtype if dtype is not None and value.is_floating_point() else None
            out[key] = value.to(device=device, dtype=cast)
        elif key == "mm_encoder_outputs":
            out[key] = {mod: _map_pooler(o, lambda t: t.to(device)) for mod, o in value.items()}
        else:
            out[key] = value
    return out


def _map_pooler(output, fn):
    pooled = output.pooler_output
    pooled = [fn(t) for t in pooled] if isinstance(pooled, list | tuple) else fn(pooled)
    return type(output)(pooler_output=pooled)


def collate(
    rows: Sequence[Mapping[str, Any]], *, pad_token_id: int, side: str = "right"
) -> tuple[dict[str, Any], list[int]]:
    """Stack the model inputs of several dialogues (each a batch of one) into one batch.

    Sequence tensors (`input_ids`, `attention_mask`, `mm_token_type_ids`, ... `[1, L]`) are
    padded to the longest row; per-image tensors (`pixel_values`, `image_sizes`,
    `image_grid_thw`) are concatenated; `mm_encoder_outputs` lists are joined in row order.

    Args:
        rows: `model_inputs` dicts (processor output or an adapter's `inputs_with` result).
        pad_token_id: id written into padded `input_ids` slots.
        side: "right" (training: positions of real tokens unchanged) or "left" (generation).

    Returns:
        `(batch, shifts)`: the batch and, per row, how far its tokens moved (left padding).

    Raises:
        ValueError: empty input, an unknown side, rows with different keys, or a sequence key
            whose rows are not batches of one.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    if not rows:
        raise ValueError("collate needs at least one row")
    keys = list(rows[0])
    for i, row in enumerate(rows):
        if set(row) != set(keys):
            raise ValueError(f"rows[{i}] has keys {sorted(row)}, rows[0] has {sorted(keys)}")
    lengths = [int(row["input_ids"].shape[-1]) for row in rows]
    width = max(lengths)
    shifts = [width - n if side == "left" else 0 for n in lengths]
    batch: dict[str, Any] = {}
    for key in keys:
        values = [row[key] for row in rows]
        if key == "mm_encoder_outputs":
            batch[key] = {mod: _join_pooler([v[mod] for v in values]) for mod in values[0]}
        elif key == "input_ids" or key in _SEQUENCE_PAD:
            fill = pad_token_id if key == "input_ids" else _SEQUENCE_PAD[key]
            padded = []
            for i, v in enumerate(values):
                if v.dim() != 2 or v.shape[0] != 1:
                    raise ValueError(
                        f"rows[{i}][{key!r}] has shape {tuple(v.shape)}: expected [1, L]"
                    )
                pad = v.new_full((1, width - v.shape[1]), fill)
                padded.append(torch.cat([pad, v] if side == "left" else [v, pad], dim=1))
            batch[key] = torch.cat(padded, dim=0)
        elif key == "position_ids" and values[0].dim() in (2, 3):
            # Positions from an adapter under positions="source": (1, L) or Qwen's M-RoPE
            # (3, 1, L). Pad along L like the other sequence keys (padded slots are masked out),
            # join along the batch dim.
            padded = []
            for v in values:
                pad = v.new_zeros((*v.shape[:-1], width - v.shape[-1]))
                padded.append(torch.cat([pad, v] if side == "left" else [v, pad], dim=-1))
            batch[key] = torch.cat(padded, dim=-2)
        elif isinstance(values[0], Tensor):
            batch[key] = torch.cat(values, dim=0)
        else:
            batch[key] = values[0]
    if "attention_mask" not in batch:
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, shifts[i] : shifts[i] + n] = 1
        batch["attention_mask"] = mask
    return batch, shifts


def _join_pooler(outputs):
    first = outputs[0].pooler_output
    if isinstance(first, list | tuple):
        pooled: Any = [t for o in outputs for t in o.pooler_output]
    else:
        pooled = torch.cat([o.pooler_output for o in outputs], dim=0)
    return type(outputs[0])(pooler_output=pooled)
