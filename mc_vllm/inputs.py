"""What vLLM takes for one image given as precomputed (compressed) embeddings.

LLaVA-style models: a [1, m, d] tensor (3-D: a 2-D tensor would be read as m images); vLLM
puts m placeholders where the prompt has the image token. Qwen-family models: the [m, d]
tensor plus the ``image_grid_thw`` [[1, h, w]] (h * w / merge^2 == m) that sets their M-RoPE
positions (mc_core.inference.serving explains the grid). vLLM never applies the projector to
embeddings:
they are already in the LLM's input space.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch

from mc_core.inference.embeds import ImageEmbeds

__all__ = ["chat_messages", "content_part", "multi_modal_data", "tensor_b64"]


def multi_modal_data(emb: ImageEmbeds, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """`multi_modal_data` of an offline `LLM.generate` prompt for one image.

    Args:
        emb: the image's embeddings.
        dtype: cast to the engine model's dtype (default: as stored).
    """
    x = emb.embeds if dtype is None else emb.embeds.to(dtype)
    if emb.grid_thw is None:
        return {"image": x.unsqueeze(0)}  # (1, m, d)
    grid = torch.tensor([list(emb.grid_thw)], dtype=torch.long)
    return {"image": {"image_embeds": x, "image_grid_thw": grid}}


def tensor_b64(x: torch.Tensor) -> str:
    """Base64 of `torch.save(x)`: what vLLM's server loads (with `weights_only=True`)."""
    buf = io.BytesIO()
    torch.save(x.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def content_part(emb: ImageEmbeds) -> dict[str, Any]:
    """The OpenAI chat content part ``{"type": "image_embeds", ...}`` for one image.

    LLaVA-style: base64 of the saved [m, d] tensor. Qwen family: ``{"image_embeds": base64,
    "image_grid_thw": [1, h, w]}``.
    """
    if emb.grid_thw is None:
        payload: Any = tensor_b64(emb.embeds)
    else:
        # One item's grid is 1-D (t, h, w): the server stacks items. A JSON array is accepted
        # for such metadata fields; a saved [1, 3] tensor is not (it becomes [1, 1, 3]).
        payload = {"image_embeds": tensor_b64(emb.embeds), "image_grid_thw": list(emb.grid_thw)}
    return {"type": "image_embeds", "image_embeds": payload}


def chat_messages(
    questions: list[str], answers: list[str], image_part: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Chat messages of a dialogue with the image in the first user turn.

    The same structure as mc_core.inference.dialogue.messages (so the model's chat template renders
    the
    same text): ``image_part`` None gives ``{"type": "image"}`` (offline rendering), else the
    given part (the server's ``image_embeds``).
    """
    if not questions or len(answers) not in (len(questions), len(questions) - 1):
        raise ValueError(
            f"dialogue has {len(questions)} questions and {len(answers)} answers: expected as "
            "many answers as questions, or one fewer"
        )
    image = image_part if image_part is not None else {"type": "image"}
    out: list[dict[str, Any]] = []
    for k, q in enumerate(questions):
        content = [image] if k == 0 else []
        out.append({"role": "user", "content": [*content, {"type": "text", "text": q}]})
        if k < len(answers):
            out.append({"role": "assistant", "content": [{"type": "text", "text": answers[k]}]})
    return out
