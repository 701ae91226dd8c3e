"""Bad requests to a served compressor: not an image, an empty body, no rows, wrong tokens.

A registered compressor is an MLflow pyfunc model (``mc_registry.pyfunc``) that
``mlflow models serve`` serves as an embedding worker (docs/serving.md). Each trial registers,
once per run of the suite, a tiny LLaVA and a metacompress checkpoint of it in a scratch SQLite
store through the register stage's write path (``tasks.tracking.register_checkpoint`` with the
base model: the pyfunc format), starts ``mlflow models serve --env-manager local`` on
127.0.0.1, sends one good request, the bad one, then a good one again.

Decision (docs/reliability.md): a bad request gets a 4xx whose message names what was wrong
(the row and column, the shape expected; MLflow's own message for a body that is not JSON),
and the server keeps serving: the good request after it returns the same embeddings as the
one before. Self-contained (``reference=False``): no pipeline run is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

from reliability.core import Context, Trial, fault

_SETUPS: dict[Path, tuple[str, str, int]] = {}  # scratch root -> (model URI, tracking URI, d)


def _png() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _registered(ctx: Context) -> tuple[str, str, int]:
    """(model URI, tracking URI, token width) of a tiny compressor registered in a scratch
    store, built once per suite run."""
    if ctx.root in _SETUPS:
        return _SETUPS[ctx.root]
    import mc_registry
    from mc_core.compressors import build
    from mc_core.compressors.checkpoint import save_compressor
    from mc_core.models import families, zoo
    from mc_core.runtime import token_dim
    from tasks import tracking

    root = ctx.scratch("served-model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, processor = zoo.build(families.get("llava").test, seed=0)
    base = zoo.save(model, processor, root / "base")
    dim = token_dim(model)
    ckpt = save_compressor(
        root / "ckpt", build("metacompress", rate=0.75, dim=dim), meta={"family": "llava"}
    )
    run = tracking.start_cell_run("serving", "tiny-llava", "0.75", params={}, uri=uri)
    reg = tracking.register_checkpoint(
        "served-tiny-llava",
        ckpt,
        run_id=run,
        score=0.5,
        metric="acc_avg",
        uri=uri,
        base_dir=base,
        promote=True,
    )
    _SETUPS[ctx.root] = (mc_registry.model_uri(reg.name), uri, dim)
    return _SETUPS[ctx.root]


def serve_trial(ctx: Context, tag: str, request, expect: str) -> Trial:
    """Serve the scratch model; good, bad (must give a 4xx containing ``expect``, where
    ``{d}`` is the token width), good."""
    import numpy as np

    from mc_registry import scoring

    model_uri, uri, dim = _registered(ctx)
    good = scoring.image_request(_png())
    log = ctx.scratch(f"{tag}-log") / "serve.log"
    with scoring.served(model_uri, tracking_uri=uri, log=log) as url:
        s0, before = scoring.invoke(url, good)
        status, body = scoring.invoke(url, request)
        s1, after = scoring.invoke(url, good)
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    error = message.split("\nError: ", 1)[-1].strip()  # MLflow puts the input's repr first
    if s0 != 200 or s1 != 200:
        return Trial(False, False, f"good requests: {s0}, then {s1}: {str(after)[:300]}")
    first, again = (np.asarray(b["predictions"][0]["embeds"]) for b in (before, after))
    same = first.shape[1] == dim and np.array_equal(first, again)
    clear = 400 <= status < 500 and expect.format(d=dim) in message and "Traceback" not in message
    how = (
        f"HTTP {status}: {error[:240]!r}; the next good request: 200, embeddings "
        f"{list(first.shape)} {'identical to the first' if same else 'DIFFER from the first'}"
    )
    return Trial(clear and same, False, how)


def _serving_fault(name: str, request, expect: str, doc: str) -> None:
    def fn(ctx: Context, trial: int) -> Trial:
        return serve_trial(ctx, name, request() if callable(request) else request, expect)

    fn.__doc__ = doc
    fault(name, "bad-input", reference=False)(fn)


def _not_an_image():
    from mc_registry import scoring

    return scoring.image_request(b"GIF89a: these bytes only look like an image")


def _token_shape():
    from mc_registry import scoring

    return scoring.tokens_request([[0.5, 0.25], [0.125, 1.0]])


_serving_fault(
    "serve-not-an-image",
    _not_an_image,
    "row 0: image: unreadable image",
    "POST /invocations to the served model with bytes that are not an image: 400 naming the "
    "row and the image, the server keeps serving",
)
_serving_fault(
    "serve-empty-body",
    b"",
    "valid JSON",
    "POST /invocations with an empty body: 400 (MLflow: not valid JSON), the server keeps serving",
)
_serving_fault(
    "serve-no-rows",
    {"dataframe_records": []},
    "no rows",
    "POST /invocations with zero rows: 400 saying the request holds no image and no tokens, "
    "the server keeps serving",
)
_serving_fault(
    "serve-token-shape",
    _token_shape,
    "row 0: tokens: shape [2, 2], expected [n, {d}]",
    "POST /invocations with visual tokens of the wrong width: 400 naming the shape given and "
    "the one expected, the server keeps serving",
)
