"""The pyfunc model of a registered compressor: images or visual tokens in, embeddings out.

``mlflow.pyfunc.load_model("models:/metacompress-tiny-llava-r0.9@champion")`` and
``mlflow models serve`` run :class:`CompressorModel` (logged as code by
``mc_registry.mlmodel.save_model``; ``pyfunc_entry.py`` instantiates it). It is the embedding
worker of docs/serving.md: ``predict`` returns, per input row, what ``metacompress compress``
writes (``mc_core.inference.serving.compress_image``): the compressed projector output
``[m, d]`` in the LLM's input space, and for Qwen-family models the grid an engine lays it on.

Input rows (the signature in ``mc_registry.mlmodel.signature``), one image each:

- ``image``: encoded image bytes (PNG, JPEG...; base64 strings in JSON requests);
- or ``tokens``: the image's visual tokens ``[n, d]`` as the adapter gives them (the projector
  output), with their layout where the model's depends on the image: ``grid`` ``[h, w]``
  (row-major patch grid; Qwen family: the merged grid, needed for ``grid_thw``) or
  ``positions`` ``[n, 2]`` (row, col in [0, 1]). A model whose layout is the same for every
  image (LLaVA-1.5: n fixed) needs neither.

Bad rows raise ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server
answers 400 with the message (which names the row and the column) and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

__all__ = ["CompressorModel", "Layout"]

_RATE_TOL = 1e-9
# PIL names the in-memory file it could not read ("<_io.BytesIO object at 0x...>"): noise.
_BUFFER = re.compile(r" <_io\.BytesIO object at 0x[0-9a-f]+>")
# Two image shapes of different aspect: a model lays every image's tokens out the same way
# (LLaVA-1.5) iff both give the same layout.
_PROBE_SIZES = ((224, 224), (160, 320))


def _bad(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: MLflow's scoring server answers 400 with this message.
    return MlflowException.invalid_parameter_value(message)


def _missing(value: Any) -> bool:
    """A cell a DataFrame left empty (None or NaN) for a column this row does not use."""
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


@dataclass(frozen=True)
class Layout:
    """How the model lays out one image's tokens when that does not depend on the image."""

    n: int
    context: Any  # mc_core.compressors.TokenContext (positions, grid)


class CompressorModel(mlflow.pyfunc.PythonModel):
    """A registered compressor and its base model's vision side, as an MLflow pyfunc model.

    ``model_config`` (MLflow's, at load: ``load_model(uri, model_config={"device": "cuda"})``,
    or ``SERVING_MODEL_CONFIG`` for ``mlflow models serve``): ``device`` (default ``auto``:
    CUDA when present).
    """

    def load_context(self, context) -> None:
        from mc_core.compressors.checkpoint import load_compressor
        from mc_core.inference.serving import engine_adapter
        from mc_core.models import zoo
        from mc_core.runtime import resolve_device, token_dim
        from mc_registry.mlmodel import BASE_MODEL, COMPRESSOR

        config = dict(context.model_config or {})
        device = resolve_device(config.get("device", "auto"), where="model_config.device")
        model, processor = zoo.load(context.artifacts[BASE_MODEL])
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.adapter = engine_adapter(self.model)
        comp = load_compressor(
            context.artifacts[COMPRESSOR],
            expect={"dim": token_dim(self.model), "family": self.adapter.family},
        )
        if comp.prompt_dependent:
            raise MlflowException(
                f"compressor {comp.name!r} is prompt-dependent: an embedding worker computes "
                "one set of tokens per image before any question"
            )
        self.compressor = comp.to(device).eval()
        self.dim = int(comp.dim)
        self._lock = threading.Lock()  # the scoring server runs requests in threads
        # The model's own token layout, probed on first use by a 'tokens' row.
        self._layout: Layout | None | bool = False  # False: not probed yet
        self._grid_thw: bool | None = None

    # -- predict -------------------------------------------------------------------------------

    # The DataFrame hint tells MLflow to check requests against the logged signature (which
    # no type hint could express), not to infer one.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Compressed embeddings, one output row per input row (``embeds`` float32 ``[m, d]``,
        ``n``, ``m``, ``grid_thw`` or None) as a pandas DataFrame."""
        rate = self._check_rate((params or {}).get("rate"))
        rows = _rows(model_input)
        with self._lock:
            out = [self._one(i, row, rate) for i, row in enumerate(rows)]
        return pd.DataFrame(out, columns=["embeds", "n", "m", "grid_thw"])

    def _check_rate(self, rate: Any) -> float | None:
        """The request's rate (None: the compressor's own), within what the compressor serves:
        its rate, or an any-rate compressor's trained span."""
        if rate is None:
            return None
        lo, hi = self.compressor.rate_span()
        try:
            value = float(rate)
        except (TypeError, ValueError):
            raise _bad(f"params.rate={rate!r}: expected a number in [{lo}, {hi}]") from None
        if not lo - _RATE_TOL <= value <= hi + _RATE_TOL:
            what = "its trained span" if self.compressor.trained_rates else "its registered rate"
            raise _bad(
                f"params.rate={value}: this compressor serves rates [{lo}, {hi}] ({what}); "
                "pick a registered model that serves it"
            )
        # Within the tolerance of the span's end: the end itself (the compressor checks exactly).
        return min(max(value, lo), hi)

    def _one(self, i: int, row: dict[str, Any], rate: float | None = None) -> dict[str, Any]:
        image, tokens = row.get("image"), row.get("tokens")
        has_image, has_tokens = not _missing(image), not _missing(tokens)
        if has_image and has_tokens:
            raise _bad(f"row {i}: both 'image' and 'tokens' given; send one of them per row")
        if not (has_image or has_tokens):
            raise _bad(
                f"row {i}: neither 'image' (encoded bytes, base64 in JSON) nor 'tokens' "
                f"([n, {self.dim}] visual tokens) given"
            )
        try:
            if has_image:
                return self._from_image(i, image, rate)
            return self._from_tokens(i, tokens, row.get("grid"), row.get("positions"), rate)
        except ValueError as err:  # mc_core names the value; the row and column are ours
            raise _bad(f"row {i}: {err}") from None

    def _from_image(self, i: int, value: Any, rate: float | None) -> dict[str, Any]:
        from mc_core.data.images import to_rgb
        from mc_core.inference.serving import compress_image

        img = to_rgb(_decode_image(value, where=f"row {i}: image"))
        emb = compress_image(
            self.model, self.processor, self.compressor, img, adapter=self.adapter, rate=rate
        )
        return _output(emb.embeds, emb.n, emb.grid_thw)

    def _from_tokens(
        self, i: int, tokens: Any, grid: Any, positions: Any, rate: float | None
    ) -> dict[str, Any]:
        import torch

        from mc_core.runtime import model_device

        where = f"row {i}"
        x = _matrix(tokens, f"{where}: tokens", cols=self.dim)
        ctx, hw = self._context(where, x.shape[0], grid, positions)
        missing = sorted(set(self.compressor.needs) - {"positions", "grid"})
        if missing:
            raise _bad(
                f"{where}: compressor {self.compressor.name!r} needs {missing} from the vision "
                "tower, which tokens alone do not carry; send the image instead"
            )
        dtype = next(self.model.parameters()).dtype
        device = model_device(self.model)
        with torch.no_grad():
            # As compress_inputs: the compressor runs in float32, its output in the model dtype.
            y, _ = self.compressor(
                torch.as_tensor(x, dtype=torch.float32, device=device), ctx, rate=rate
            )
        grid_thw = None
        if self._grid_family():
            from mc_core.inference.serving import engine_grid

            if hw is None:
                raise _bad(
                    f"{where}: this model places image tokens on a grid (image_grid_thw): give "
                    "'grid' [h, w], the tokens' merged patch grid, so the engine's grid can "
                    "be laid out"
                )
            merge = int(self.model.config.vision_config.spatial_merge_size)
            grid_thw = engine_grid(int(y.shape[0]), hw, merge)
        return _output(y.to(dtype), x.shape[0], grid_thw)

    def _context(self, where: str, n: int, grid: Any, positions: Any):
        """The ``TokenContext`` of n tokens and their (h, w) grid when known."""
        import torch

        from mc_core.compressors import TokenContext
        from mc_core.models.adapters.positions import grid_positions
        from mc_core.runtime import model_device

        device = model_device(self.model)
        hw = None if _missing(grid) else _grid(grid, f"{where}: grid", n)
        if not _missing(positions):
            pos = _matrix(positions, f"{where}: positions", cols=2, rows=n)
            pos = torch.as_tensor(pos, dtype=torch.float32, device=device)
            return TokenContext(positions=pos, grid=hw), hw
        if hw is not None:
            return TokenContext(positions=grid_positions(*hw, device=device), grid=hw), hw
        layout = self._fixed_layout()
        if layout is not None and layout.n == n:
            ctx = layout.context
            return TokenContext(positions=ctx.positions, grid=ctx.grid), ctx.grid
        fixed = f"; this model's images all have n = {layout.n}" if layout is not None else ""
        raise _bad(
            f"{where}: tokens have n = {n} rows and no layout: give 'grid' [h, w] (their "
            f"row-major patch grid) or 'positions' [n, 2]{fixed}"
        )

    # -- the model's own layout ----------------------------------------------------------------

    def _probe(self, size: tuple[int, int]):
        """(TokenContext, whether the inputs carry an image_grid_thw) of a blank image."""
        from PIL import Image

        from mc_core.inference.dialogue import to_device
        from mc_core.runtime import model_device

        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}]}],
            add_generation_prompt=False,
            tokenize=False,
        )
        image = Image.new("RGB", size, (127, 127, 127))
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        inputs = to_device(dict(inputs), model_device(self.model))
        (ctx,) = self.adapter.contexts(inputs)
        return ctx, inputs.get("image_grid_thw") is not None

    def _fixed_layout(self) -> Layout | None:
        """The layout every image gets, or None when it depends on the image (memoised)."""
        if self._layout is False:
            (c1, _), (c2, _) = (self._probe(s) for s in _PROBE_SIZES)
            same = (
                c1.positions is not None
                and c2.positions is not None
                and c1.positions.shape == c2.positions.shape
                and c1.grid == c2.grid
                and bool((c1.positions == c2.positions).all())
            )
            self._layout = Layout(int(c1.positions.shape[0]), c1) if same else None
        return self._layout

    def _grid_family(self) -> bool:
        """Whether the engine needs an ``image_grid_thw`` with the tokens (Qwen family)."""
        if self._grid_thw is None:
            self._grid_thw = self._probe(_PROBE_SIZES[0])[1]
        return self._grid_thw


# -- request parsing ---------------------------------------------------------------------------


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """The request's rows as dicts (a DataFrame after MLflow's schema check; a dict of columns
    or a list of row dicts when called without one)."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        try:
            rows = pd.DataFrame(model_input).to_dict("records")
        except ValueError as err:
            raise _bad(f"input columns of unequal length: {err}") from None
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        rows = list(model_input)
    else:
        raise _bad(
            f"input of type {type(model_input).__name__}: expected rows with an 'image' or "
            "'tokens' column (a DataFrame, a dict of columns or a list of row dicts)"
        )
    if not rows:
        raise _bad(
            "no rows: the request holds no image and no tokens (one row per image: 'image' "
            "bytes, base64 in JSON, or 'tokens' [n, d])"
        )
    return rows


def _decode_image(value: Any, *, where: str):
    """The PIL image of one ``image`` cell: bytes, or a base64 string (JSON ``inputs``
    requests reach the model undecoded)."""
    import numpy as np

    from mc_core.data.images import decode

    if isinstance(value, np.ndarray | list | tuple):
        values = np.asarray(value, dtype=object).reshape(-1)
        if values.size != 1:
            # MLflow turns a columnar {"inputs": {"image": [a, b]}} into ONE row holding both.
            raise _bad(
                f"{where}: {values.size} values in one row: send one row per image "
                '("dataframe_records", "dataframe_split" or "inputs": [{"image": ...}, ...])'
            )
        value = values[0]
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _bad(f"{where}: expected encoded image bytes, got {type(value).__name__}")
    data = bytes(value)
    try:
        return decode(data, where=where, what="image")
    except ValueError as first:
        try:  # base64 text: what a binary cell holds when MLflow did not decode it
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            why = _BUFFER.sub("", str(first))
            raise _bad(f"{why} ({len(data)} bytes; send PNG/JPEG bytes, base64 in JSON)") from None
        if not raw:
            raise _bad(f"{where}: empty image (no bytes)") from None
        try:
            return decode(raw, where=where, what="image (base64-decoded)")
        except ValueError as err:
            raise _bad(f"{_BUFFER.sub('', str(err))} ({len(raw)} bytes after base64)") from None


def _matrix(value: Any, where: str, *, cols: int, rows: int | None = None):
    """``value`` as a finite float64 array ``[rows, cols]``; 400 naming the shape otherwise."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.tolist()  # MLflow's schema check leaves arrays of row arrays
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _bad(
            f"{where}: not a rectangular array of numbers (rows of unequal length?)"
        ) from None
    want = f"[{rows if rows is not None else 'n'}, {cols}]"
    if (
        arr.ndim != 2
        or arr.shape[1] != cols
        or arr.shape[0] < 1
        or (rows is not None and arr.shape[0] != rows)
    ):
        raise _bad(f"{where}: shape {list(arr.shape)}, expected {want}")
    if not np.isfinite(arr).all():
        raise _bad(f"{where}: holds NaN or infinite values")
    return arr


def _grid(value: Any, where: str, n: int) -> tuple[int, int]:
    import numpy as np

    arr = np.asarray(value).reshape(-1)
    if arr.size != 2 or not all(float(v).is_integer() and v >= 1 for v in arr):
        raise _bad(f"{where}: {arr.tolist()}, expected [h, w] (two positive ints)")
    h, w = (int(v) for v in arr)
    if h * w != n:
        raise _bad(f"{where}: [{h}, {w}] has {h * w} cells, the tokens have n = {n} rows")
    return h, w


def _output(embeds, n: int, grid_thw) -> dict[str, Any]:
    import torch

    arr = embeds.detach().to(device="cpu", dtype=torch.float32).numpy()
    return {
        "embeds": arr,
        "n": int(n),
        "m": int(arr.shape[0]),
        "grid_thw": None if grid_thw is None else [int(v) for v in grid_thw],
    }
