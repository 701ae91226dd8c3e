"""Run saved dialogues on saved embeddings through vLLM; write the answers as JSON.

    python -m mc_vllm.replay SPEC.json OUT.json

SPEC: ``{"model": DIR, "mode": "offline" | "server", "max_tokens": 4,
"dialogues": [{"embeds": FILE.safetensors, "questions": [q1, q2, q3]}, ...]}``.
OUT: per dialogue ``answers``, ``prompt_tokens`` (and offline: ``token_ids``,
``first_logprobs``, the top first-token log-probs per turn), plus ``engine_start_s`` and
``run_s``. Offline mode advances all dialogues together (one `generate` per turn); server
mode starts an OpenAI-compatible server on a free port, runs each dialogue through it, then
stops it. tests/test_vllm.py compares OUT with transformers' answers; docs/serving.md shows it
by hand. Optional SPEC keys ``engine`` / ``server``: extra `vllm.LLM` arguments / server flags.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mc_core.inference.embeds import load_embeds
from mc_core.io import write_json

__all__ = ["main", "run_offline", "run_server"]


def _check_spec(spec: dict[str, Any], where: str) -> None:
    for key in ("model", "dialogues"):
        if key not in spec:
            raise ValueError(f"{where}: missing key {key!r}")
    if spec.get("mode", "offline") not in ("offline", "server"):
        raise ValueError(f"{where}: mode={spec['mode']!r}; expected 'offline' or 'server'")
    for i, d in enumerate(spec["dialogues"]):
        qs = d.get("questions")
        if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            raise ValueError(f"{where}: dialogues[{i}].questions={qs!r}: non-empty strings")
    if len({len(d["questions"]) for d in spec["dialogues"]}) > 1:
        raise ValueError(f"{where}: every dialogue needs the same number of turns")


def run_offline(spec: dict[str, Any]) -> dict[str, Any]:
    """All dialogues through `vllm.LLM.generate`, turn by turn."""
    from vllm import LLM

    from mc_vllm.offline import OfflineChat, engine_kwargs

    embeds = [load_embeds(d["embeds"]) for d in spec["dialogues"]]
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(spec["model"], **spec.get("engine", {})))
    start_s = time.perf_counter() - t0
    chat = OfflineChat(llm, embeds, max_tokens=int(spec.get("max_tokens", 4)))
    t0 = time.perf_counter()
    for k in range(len(spec["dialogues"][0]["questions"])):
        chat.ask([d["questions"][k] for d in spec["dialogues"]])
    run_s = time.perf_counter() - t0
    rows = [
        {
            "answers": [t.answer for t in d.turns],
            "token_ids": [t.token_ids for t in d.turns],
            "prompt_tokens": [t.prompt_tokens for t in d.turns],
            "first_logprobs": [t.first_logprobs for t in d.turns],
        }
        for d in chat.rows
    ]
    return {"dialogues": rows, "engine_start_s": start_s, "run_s": run_s}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_server(spec: dict[str, Any], log: Path | None = None) -> dict[str, Any]:
    """Each dialogue through a fresh OpenAI-compatible server (stopped at the end)."""
    from mc_vllm.server import ServerChat, server_command, wait_ready

    port = _free_port()
    cmd = server_command(sys.executable, spec["model"], port=port, **spec.get("server", {}))
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc=proc)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = []
        for d in spec["dialogues"]:
            chat = ServerChat(
                base,
                spec["model"],
                load_embeds(d["embeds"]),
                max_tokens=int(spec.get("max_tokens", 4)),
            )
            for q in d["questions"]:
                chat.ask(q)
            rows.append({"answers": chat.answers, "prompt_tokens": chat.prompt_tokens})
        run_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()
    return {"dialogues": rows, "engine_start_s": start_s, "run_s": run_s}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    _check_spec(spec, str(spec_path))
    if spec.get("mode", "offline") == "server":
        log = os.environ.get("MC_VLLM_SERVER_LOG")
        result = run_server(spec, Path(log) if log else None)
    else:
        result = run_offline(spec)
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
