"""A registered compressor behind MLflow's scoring server, and requests to it.

``mlflow models serve -m models:/<name>@champion --env-manager local -h 127.0.0.1 -p PORT``
serves the pyfunc model (``mc_registry.pyfunc``): ``POST /invocations`` with one row per image
returns the compressed embeddings. :func:`served` starts that command in its own process
group and stops the group (the CLI starts uvicorn as a child), for the tests, the
fault-injection suite and scripts; :func:`invoke` posts a request; :func:`image_request` and
:func:`tokens_request` build the JSON bodies (docs/serving.md shows them with curl);
:func:`image_embeds` turns an answer into what the vLLM helpers (mc_vllm) send.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "free_port",
    "image_embeds",
    "image_request",
    "invoke",
    "served",
    "tokens_request",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_request(*images: bytes, rate: float | None = None) -> dict[str, Any]:
    """The JSON body for encoded images (one row each, base64 as MLflow's binary columns)."""
    rows = [{"image": base64.b64encode(b).decode("ascii")} for b in images]
    return _body(rows, rate)


def tokens_request(
    tokens: Sequence, *, grid: Sequence[int] | None = None, rate: float | None = None
) -> dict[str, Any]:
    """The JSON body for one image's visual tokens ``[n, d]`` (floats), with its grid."""
    import numpy as np

    row: dict[str, Any] = {"tokens": np.asarray(tokens, dtype=np.float64).tolist()}
    if grid is not None:
        row["grid"] = [int(v) for v in grid]
    return _body([row], rate)


def _body(rows: list[dict], rate: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"dataframe_records": rows}
    if rate is not None:
        body["params"] = {"rate": float(rate)}
    return body


def invoke(url: str, body: dict | bytes | str, *, timeout: float = 60) -> tuple[int, Any]:
    """POST ``body`` to ``<url>/invocations``; returns (HTTP status, parsed JSON or text)."""
    data = (
        body
        if isinstance(body, bytes)
        else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    )
    req = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def image_embeds(prediction: dict[str, Any], *, family: str = ""):
    """One row of the server's ``predictions`` as the ``ImageEmbeds`` the vLLM helpers take
    (``mc_vllm.inputs.content_part``, ``mc_vllm.server.ServerChat``); ``family``: the model
    metadata's, for the record."""
    import torch

    from mc_core.inference.embeds import ImageEmbeds

    grid = prediction.get("grid_thw")
    return ImageEmbeds(
        embeds=torch.tensor(prediction["embeds"], dtype=torch.float32),
        family=family,
        n=int(prediction["n"]),
        grid_thw=None if grid is None else tuple(int(v) for v in grid),
    )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def served(
    model_uri: str,
    *,
    tracking_uri: str | None = None,
    port: int | None = None,
    timeout: float = 120,
    log: str | Path | None = None,
) -> Iterator[str]:
    """Serve ``model_uri`` with ``mlflow models serve --env-manager local`` on 127.0.0.1.

    Yields the base URL once ``/ping`` answers. The server runs in this Python's environment
    (its ``bin`` first on PATH: the CLI starts ``uvicorn`` from there) with
    ``MLFLOW_TRACKING_URI`` = ``tracking_uri`` (default: this process's), output to ``log``
    (default: discarded).

    Raises:
        RuntimeError: the server exited or was not healthy within ``timeout`` seconds (with
            the end of its log when there is one).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    # Own process group: stopping it stops uvicorn, the CLI's child, too.
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {proc.returncode}"
                    if proc.poll() is not None
                    else (f"not healthy after {timeout:.0f} s")
                )
                tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
                raise RuntimeError(f"mlflow models serve -m {model_uri} {why}\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        if log:
            out.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    # uvicorn (the CLI's child) may outlive the CLI: the group goes, whoever is left in it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
