"""``--model metacompress``: any base model + any compressor as an lmms-eval model.

    lmms-eval --model metacompress --tasks gqa --batch_size 1 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,compressor=visionzip,rate=0.9

``model_args``: ``pretrained`` and ``compressor`` as in ``mc_lmms.loading``; ``rate`` (needed
for method names, checked against checkpoints; an any-rate checkpoint runs at any ``rate`` in
its trained span, ``compressor=<folder>,rate=0.8``); ``device``, ``dtype`` (``auto``: bf16 on CUDA,
float32 on CPU, as the project's evaluator); ``max_new_tokens`` (when a task does not set it);
``tracking_uri`` (MLflow, for ``models:/``).

Every request runs as an ``mc_core.inference.conversation.Conversation``: the image's visual tokens
are
compressed once and the KV cache is reused, so

- ``generate_until``: one question, greedy answer (stop strings cut it);
- ``generate_until_multi_round``: one dialogue per document, turn after turn on the same cache
  (prompt-dependent methods such as fastv keep turn 1's choice), exactly the evaluator's path;
- ``loglikelihood``: the continuation scored as the assistant's answer, teacher forced on the
  compressed tokens (every family with a chat template); as lmms-eval's own models, it returns
  the mean negative log-likelihood per token, which its multiple-choice scoring minimises.

Each generation reports its prompt tokens after compression as ``TokenCounts.input_tokens``
(multi-round: the whole compressed dialogue the model read), so lmms-eval's samples and token
summary show the saving. Decoding is greedy whatever ``do_sample`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm.auto import tqdm

from mc_core.data.images import to_rgb
from mc_core.inference.compress import compress_inputs
from mc_core.inference.conversation import Conversation
from mc_core.inference.dialogue import answer_token_ids, encode_dialogue, render, to_device
from mc_core.models.families import adapter_for
from mc_core.runtime import model_device
from mc_lmms.loading import load_base, parse_rate, resolve_compressor

__all__ = ["MetaCompress"]

_MAX_ROUNDS = 1000  # a task whose doc_to_text never says "terminal" is a bug, not a dialogue


def _positive_int(value: Any, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or float(value) != n:
        raise ValueError(f"{where}={value!r}: expected a positive int")
    return n


def _same_images(a: Sequence[Any], b: Sequence[Any]) -> bool:
    pairs = zip(a, b, strict=False)
    return len(a) == len(b) and all(
        x is y or (x.size == y.size and x.tobytes() == y.tobytes()) for x, y in pairs
    )


class MetaCompress(lmms):
    """lmms-eval model: a frozen LVLM whose visual tokens go through a compressor."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        compressor: str = "none",
        rate: float | str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 16,
        tracking_uri: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"model_args: unknown keys {sorted(unknown)}; expected pretrained, compressor, "
                "rate, device, dtype, max_new_tokens, tracking_uri"
            )
        if str(batch_size) != "1":
            logger.info(f"metacompress: batch_size={batch_size} ignored, dialogues run one by one")
        self.max_new_tokens = _positive_int(max_new_tokens, "model_args max_new_tokens")
        self.model, self.processor = load_base(pretrained, device=device, dtype=dtype)
        self.adapter = adapter_for(self.model)
        self.rate = parse_rate(rate)
        self.compressor = resolve_compressor(
            compressor, rate=self.rate, model=self.model, tracking_uri=tracking_uri
        )
        # Passed to every compression call: an any-rate checkpoint runs at the requested rate.
        self.rate = None if self.compressor is None else self.rate
        self._device = model_device(self.model)
        self._dtype = next(self.model.parameters()).dtype
        self._strip = [t for t in {getattr(self.processor, "image_token", None), "<image>"} if t]
        self._warned_sampling = False
        name = "none" if self.compressor is None else self.compressor.name
        rate_s = "" if self.compressor is None else f" rate {self.rate or self.compressor.rate}"
        logger.info(
            f"metacompress: {type(self.model).__name__} on {self._device}, "
            f"compressor {name}{rate_s} ({compressor})"
        )

    def clean(self) -> None:
        """lmms-eval's cleanup drops the nn.Modules; the adapter holds the model too."""
        super().clean()
        self.adapter = None

    # -- helpers --------------------------------------------------------------------------

    def _images(self, visuals: Any, where: str) -> list:
        flat = visuals if isinstance(visuals, list | tuple) else [visuals]
        images = [to_rgb(v) for v in flat if v is not None and hasattr(v, "convert")]
        if not images or len(images) != len([v for v in flat if v is not None]):
            raise ValueError(
                f"{where}: the metacompress model takes image documents (PIL images), got "
                f"{[type(v).__name__ for v in flat]}"
            )
        return images

    def _text(self, text: str) -> str:
        # The chat template places the image itself; a task's own placeholder would add one.
        for token in self._strip:
            text = text.replace(token, "")
        return text.strip()

    def _conversation(self, images: list, gen_kwargs: dict) -> Conversation:
        if not self._warned_sampling and (
            gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
        ):
            logger.warning("metacompress: sampling requested, decoding greedily")
            self._warned_sampling = True
        limit = gen_kwargs.get("max_new_tokens", self.max_new_tokens)
        return Conversation(
            self.model,
            self.processor,
            self.compressor,
            images=images,
            adapter=self.adapter,
            max_new_tokens=_positive_int(limit, "max_new_tokens"),
            instruction="",  # lmms-eval's task prompts carry their own (post_prompt)
            rate=self.rate,
        )

    def _ask(self, conv: Conversation, text: str, gen_kwargs: dict) -> str:
        answer = conv.ask(self._text(text))
        until = gen_kwargs.get("until") or []
        cut = answer
        for stop in [until] if isinstance(until, str) else until:
            if stop:
                cut = cut.split(stop)[0]
        if cut != answer:  # later turns must see what the task received
            conv.set_answer(conv.turns - 1, cut)
        return cut

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    # -- lmms-eval API ----------------------------------------------------------------------

    def generate_until(self, requests) -> list[GenerationResult]:
        """One question per request, answered on the compressed image."""
        out = []
        for req in tqdm(requests, desc="metacompress generate", disable=self.rank != 0):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            images = self._images(doc_to_visual(doc), f"{task}/{split}/{doc_id}")
            conv = self._conversation(images, gen_kwargs)
            answer = self._ask(conv, ctx, gen_kwargs)
            out.append(GenerationResult(answer, TokenCounts(input_tokens=conv.cache_tokens[-1])))
        return out

    def generate_until_multi_round(self, requests) -> list[GenerationResult]:
        """One dialogue per request: compress once, then every round on the same KV cache."""
        out = []
        for req in tqdm(requests, desc="metacompress dialogues", disable=self.rank != 0):
            ctx, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            where = f"{task}/{split}/{doc_id}"
            doc = self._doc(task, split, doc_id)
            images = self._images(doc_to_visual(doc), where)
            conv = self._conversation(images, gen_kwargs)
            answers = [self._ask(conv, ctx, gen_kwargs)]
            info = None
            for round_idx in range(1, _MAX_ROUNDS + 1):
                visuals, text, terminal, _, info = doc_to_text(
                    doc,
                    previous_output=list(answers),
                    round_idx=round_idx,
                    previous_round_info=info,
                )
                if terminal:
                    break
                if visuals and not _same_images(self._images(visuals, where), images):
                    raise ValueError(
                        f"{where}: round {round_idx + 1} brings new images; a metacompress "
                        "dialogue compresses the first round's images once"
                    )
                answers.append(self._ask(conv, text, gen_kwargs))
            else:
                raise ValueError(f"{where}: no terminal round after {_MAX_ROUNDS} rounds")
            out.append(GenerationResult(answers, TokenCounts(input_tokens=conv.cache_tokens[-1])))
        return out

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """The continuation scored as the assistant's answer: `(loss, is_greedy)`.

        `loss` is the mean negative log-likelihood per continuation token, what lmms-eval's
        own models return and what its multiple-choice scoring expects (it takes the argmin,
        not the argmax of a log-probability). `is_greedy`: greedy decoding would produce it.

        Each pair travels inside a `GenerationResult`: lmms-eval 0.7.3's
        `unwrap_generation_output` turns a bare tuple into its string, which its
        multiple-choice scoring then fails to unpack; the wrapper's payload passes unchanged.
        """
        out = []
        for req in tqdm(requests, desc="metacompress loglikelihood", disable=self.rank != 0):
            ctx, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            where = f"{task}/{split}/{doc_id}"
            doc = self._doc(task, split, doc_id)
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = self._images(doc_to_visual(doc), where)
            out.append(self._continuation(images, self._text(ctx), str(target), where))
        return out

    @torch.no_grad()
    def _continuation(self, images: list, ctx: str, target: str, where: str):
        # The leading space of lmms-eval continuations is a raw-LM convention; in a chat
        # template the answer is the assistant turn's content.
        answer = target.strip()
        if not answer:
            raise ValueError(f"{where}: empty continuation {target!r}")
        full, positions = encode_dialogue(
            self.processor, images, [ctx], [answer], include_end=False, instruction=""
        )
        full = to_device(full, self._device, self._dtype)
        prompt_text = render(self.processor, [ctx], [], n_images=len(images), instruction="")
        prompt = self.processor(text=[prompt_text], images=images, return_tensors="pt")
        prompt = to_device(dict(prompt), self._device, self._dtype)
        self.adapter.reset_state()
        # Compressed from the prompt alone (a prompt-dependent method must not see the answer);
        # visual tokens do not depend on the text, so they slot into the full encoding.
        _, tokens, P = compress_inputs(
            self.model, self.adapter, self.compressor, prompt, rate=self.rate
        )
        inputs, shift = full, 0
        if tokens is not None:
            inputs = self.adapter.inputs_with(full, tokens, P=P)
            shift = int(full["input_ids"].shape[1]) - int(inputs["input_ids"].shape[1])
        self.adapter.reset_state()
        keep = (positions - shift).to(self._device)
        logits = self.model(**inputs, logits_to_keep=keep).logits[0].float()
        targets = answer_token_ids(full, positions.to(self._device)).to(self._device)
        nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).mean()
        greedy = bool((logits.argmax(-1) == targets).all())
        prompt_tokens = int(positions[0]) + 1 - shift  # tokens before the answer's first
        return GenerationResult((float(nll), greedy), TokenCounts(input_tokens=prompt_tokens))
