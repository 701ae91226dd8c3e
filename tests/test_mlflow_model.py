"""A registered compressor is an MLflow pyfunc model: loaded with ``mlflow.pyfunc.load_model``
and served with ``mlflow models serve``, it gives the embeddings ``Conversation`` and
``compress_image`` (``metacompress compress``) compute.

The workspace is built once per module: a tiny LLaVA saved as ``models/base/tiny-llava``, a
metacompress checkpoint of it (perturbed random weights: a non-trivial P), an eval report that
passes the gate, and ``tasks.register.main``: the register stage's own code path into a
temporary SQLite store (tests/test_gating.py's pattern).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_family, build_llava, make_image

import mc_registry
from mc_core.compressors import build
from mc_core.compressors.checkpoint import save_compressor
from mc_core.compressors.ops import kept_tokens
from mc_core.inference.conversation import Conversation
from mc_core.inference.serving import compress_image, engine_adapter
from mc_core.models import zoo
from mc_core.runtime import token_dim
from mc_registry import mlmodel, scoring
from tasks import cells, common, lineage, register, tracking
from tasks.params import RegisterParams

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH, RATE = "tiny-llava", 0.75
# The served and the reference embeddings come from the same float32 kernels on the same
# weights and pixels (PNG is lossless; JSON carries float32 values exactly). What can differ
# is the order of float reductions when the server's process uses another thread count than
# this one (the tests run on one torch thread): differences of a few float32 ulps of values
# ~1, so 1e-5 absolute; a wrong P (another row, another weight) moves them by ~1e-1.
ATOL, RTOL = 1e-5, 1e-5


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _eval_report(mc: float = 0.6, sample: float = 0.3) -> dict:
    methods = {"metacompress": {"acc_avg": mc}, "sample": {"acc_avg": sample}}
    return {
        "methods": {"metacompress": {"acc_avg": mc}},
        "validation": {"dataset": "synthetic", "n_dialogues": 4, "methods": methods},
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace after ``register@tiny-llava-0.75``: paths, URI, the record."""
    root = tmp_path_factory.mktemp("mlflow-model")
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}"
    params = SimpleNamespace(
        register=RegisterParams(),
        train=SimpleNamespace(method="metacompress"),
        tracking=SimpleNamespace(experiment="mlflow-model"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(mc_registry.ENV_URI, uri)
        mp.chdir(root)
        mp.setattr(common, "load_params", lambda sections, who: params)
        mc_registry.migrate(uri)
        shutil.copy(db, root / "empty.db")  # migrated, for tests that need a store of their own
        model, processor = build_llava()
        zoo.save(model, processor, cells.base_dir(ARCH))
        comp = build("metacompress", rate=RATE, dim=token_dim(model))
        with torch.no_grad():  # away from the init, so a wrong weight shows
            gen = torch.Generator().manual_seed(1)
            for p in comp.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        save_compressor(cells.compressor_dir(ARCH, RATE), comp, meta={"family": "llava"})
        common.write_json(cells.cell_file("eval", ARCH, RATE), _eval_report())
        register.main(["--arch", ARCH, "--rate", str(RATE)])
        record = json.loads(cells.cell_file("registry", ARCH, RATE).read_text())
    return SimpleNamespace(root=root, uri=uri, record=record, params=params)


@pytest.fixture
def in_ws(ws, monkeypatch):
    monkeypatch.setenv(mc_registry.ENV_URI, ws.uri)
    monkeypatch.chdir(ws.root)
    return ws


@pytest.fixture(scope="module")
def reference(ws):
    """The base model and compressor as the library loads them from the workspace."""
    from mc_core.compressors.checkpoint import load_compressor

    model, processor = zoo.load(ws.root / cells.base_dir(ARCH))
    comp = load_compressor(ws.root / cells.compressor_dir(ARCH, RATE)).eval()
    return model.requires_grad_(False), processor, comp


@pytest.fixture(scope="module")
def loaded(ws):
    """``mlflow.pyfunc.load_model`` of the champion URI (as a user types it)."""
    import mlflow.pyfunc

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(mc_registry.ENV_URI, ws.uri)
        return mlflow.pyfunc.load_model(ws.record["uri"])


IMAGES = [make_image(48, 64, seed=3), make_image(40, 40, seed=5)]


def test_the_registered_version_is_a_pyfunc_model_with_signature_and_lineage(in_ws, tmp_path):
    import mlflow.models

    rec = in_ws.record
    assert rec["uri"] == f"models:/metacompress-{ARCH}-r{RATE}@champion"
    assert (rec["version"], rec["champion"], rec["created"]) == ("1", "1", True)
    tags = mc_registry.version_tags(rec["name"], rec["version"])
    assert tags[mlmodel.FORMAT_TAG] == mlmodel.FORMAT
    assert tags["score_split"] == "val" and tags["base_sha256"]  # the stage's tags are kept
    client = mc_registry.client(in_ws.uri)
    source = client.get_model_version_download_uri(rec["name"], rec["version"])
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path)))
    info = mlflow.models.Model.load(str(local))
    flavor = info.flavors["python_function"]
    # Models from code: the entry file is in the model, nothing of ours is pickled.
    assert Path(flavor["model_code_path"]).name == "pyfunc_entry.py"
    assert not list(local.rglob("*.pkl")) and "python_model" not in flavor
    assert set(flavor["artifacts"]) == {"compressor", "base_model"}
    assert (mlmodel.checkpoint_in(local) / "compressor.safetensors").read_bytes() == (
        in_ws.root / cells.compressor_dir(ARCH, RATE) / "compressor.safetensors"
    ).read_bytes()
    sig = info.signature
    assert sig.inputs.input_names() == ["image", "tokens", "grid", "positions"]
    assert not any(c.required for c in sig.inputs.inputs)  # image OR tokens per row
    assert sig.outputs.input_names() == ["embeds", "n", "m", "grid_thw"]
    assert [(p.name, p.default) for p in sig.params.params] == [("rate", RATE)]
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["image"]
    meta = info.metadata
    assert (meta["method"], meta["family"], meta["rate"]) == ("metacompress", "llava", RATE)
    assert meta["rate_range"] == [RATE, RATE] and meta["arch"] == ARCH
    assert meta["ckpt_sha256"] == tags["ckpt_sha256"] == rec["ckpt_sha256"]
    assert (
        meta["base_model"]["sha256"]
        == tags["base_sha256"]
        == lineage.checkpoint_hash(in_ws.root / cells.base_dir(ARCH))
    )
    assert meta["base_model"]["kind"] == "tiny"


def test_pyfunc_predict_equals_conversation_and_compress_image(ws, loaded, reference):
    model, processor, comp = reference
    out = loaded.predict(pd.DataFrame({"image": [_png(im) for im in IMAGES]}))
    assert list(out.columns) == ["embeds", "n", "m", "grid_thw"] and len(out) == 2
    for image, row in zip(IMAGES, out.itertuples(), strict=True):
        conv = Conversation(model, processor, comp, images=[image], max_new_tokens=1)
        conv.ask("what colour is at row 1 col 2 ?")
        want = conv.tokens[0]  # the compressed input the LLM saw
        assert row.embeds.dtype == np.float32 and row.embeds.shape == tuple(want.shape)
        torch.testing.assert_close(torch.from_numpy(row.embeds), want, atol=ATOL, rtol=RTOL)
        emb = compress_image(model, processor, comp, image)
        torch.testing.assert_close(torch.from_numpy(row.embeds), emb.embeds, atol=ATOL, rtol=RTOL)
        assert (row.n, row.m, row.grid_thw) == (emb.n, emb.m, None)
        assert row.m == comp.kept(row.n) < row.n
    # Two images, two different outputs: the comparison above can fail.
    assert np.abs(out.embeds[0] - out.embeds[1]).max() > 100 * ATOL


def test_precomputed_tokens_give_the_image_embeddings(loaded, reference):
    """The projector output [n, d] instead of the image: the same embeddings (LLaVA's layout is
    fixed, so no grid is needed; with the grid, and with grid and positions, too)."""
    model, processor, comp = reference
    image = IMAGES[0]
    from_image = loaded.predict(pd.DataFrame({"image": [_png(image)]})).embeds[0]
    adapter = engine_adapter(model)
    inputs = dict(processor(text=["<image>"], images=[image], return_tensors="pt"))
    (tokens,) = adapter.visual_tokens(inputs)
    (ctx,) = adapter.contexts(inputs)
    rows = pd.DataFrame(
        {
            "tokens": [tokens.numpy().tolist()] * 3,
            "grid": [None, list(ctx.grid), list(ctx.grid)],
            "positions": [None, None, ctx.positions.numpy().tolist()],
        }
    )
    out = loaded.predict(rows)
    for got in out.embeds:
        np.testing.assert_allclose(got, from_image, atol=ATOL, rtol=RTOL)
    # The layout matters: a wrong grid gives other embeddings.
    h, w = ctx.grid
    other = loaded.predict(pd.DataFrame({"tokens": [tokens.tolist()], "grid": [[h * w // 4, 4]]}))
    assert np.abs(other.embeds[0] - from_image).max() > 100 * ATOL


def test_qwen_gives_the_engine_grid_and_tokens_need_theirs(in_ws, tmp_path):
    """A grid-positioned family (Qwen2-VL): the output carries the engine's image_grid_thw as
    compress_image lays it out; tokens alone do not say their grid, so they need one."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model, processor = build_family("qwen2_vl")
    base = zoo.save(model, processor, tmp_path / "base-qwen")
    comp = build("pool", rate=0.75, dim=token_dim(model))
    ckpt = save_compressor(tmp_path / "ckpt-qwen", comp, meta={"family": "qwen2_vl"})
    run = tracking.start_cell_run("qwen", "tiny-qwen2-vl", "0.75", params={})
    reg = tracking.register_checkpoint(
        "qwen-pool", ckpt, run_id=run, score=0.5, metric="acc_avg", base_dir=base, promote=True
    )
    loaded = mlflow.pyfunc.load_model(mc_registry.model_uri(reg.name))
    image = IMAGES[0]
    emb = compress_image(model, processor, comp, image)
    (row,) = loaded.predict(pd.DataFrame({"image": [_png(image)]})).itertuples()
    torch.testing.assert_close(torch.from_numpy(row.embeds), emb.embeds, atol=ATOL, rtol=RTOL)
    assert row.grid_thw == list(emb.grid_thw) and (row.n, row.m) == (emb.n, emb.m)
    adapter = engine_adapter(model)
    inputs = dict(processor(text=["<|image_pad|>"], images=[image], return_tensors="pt"))
    (tokens,) = adapter.visual_tokens(inputs)
    (ctx,) = adapter.contexts(inputs)
    (got,) = loaded.predict(
        pd.DataFrame({"tokens": [tokens.tolist()], "grid": [list(ctx.grid)]})
    ).itertuples()
    np.testing.assert_allclose(got.embeds, row.embeds, atol=ATOL, rtol=RTOL)
    assert got.grid_thw == row.grid_thw
    with pytest.raises(MlflowException, match="row 0: tokens have n = .* give 'grid'"):
        loaded.predict(pd.DataFrame({"tokens": [tokens.tolist()]}))


def test_an_any_rate_version_serves_the_rate_of_each_request(in_ws, tmp_path):
    """An any-rate checkpoint's model takes ``params.rate`` anywhere in its trained span: each
    request equals compress_image at that rate; a rate outside it is a 400 naming the span."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model, processor = build_llava()
    base = zoo.save(model, processor, tmp_path / "base")
    comp = build("metacompress", rate=0.7, dim=token_dim(model))
    comp.trained_rates = (0.5, 0.9)
    ckpt = save_compressor(tmp_path / "any", comp, meta={"family": "llava"})
    assert mlmodel.describe(ckpt, base)["rate_range"] == [0.5, 0.9]
    run = tracking.start_cell_run("any", ARCH, "any", params={})
    reg = tracking.register_checkpoint(
        "any-rate", ckpt, run_id=run, score=0.5, metric="acc_avg", base_dir=base, promote=True
    )
    loaded = mlflow.pyfunc.load_model(mc_registry.model_uri(reg.name))
    image, rows = IMAGES[0], pd.DataFrame({"image": [_png(IMAGES[0])]})
    ms = set()
    for rate in (0.5, 0.65, 0.9, None):
        (row,) = loaded.predict(rows, params=None if rate is None else {"rate": rate}).itertuples()
        emb = compress_image(model, processor, comp, image, rate=rate)
        torch.testing.assert_close(torch.from_numpy(row.embeds), emb.embeds, atol=ATOL, rtol=RTOL)
        assert row.m == kept_tokens(row.n, 0.7 if rate is None else rate) == emb.m
        ms.add(row.m)
    assert len(ms) == 4  # four rates, four token counts: the rate reached the compressor
    with pytest.raises(MlflowException, match=r"serves rates \[0.5, 0.9\] \(its trained span\)"):
        loaded.predict(rows, params={"rate": 0.95})


@pytest.mark.parametrize(
    ("rows", "params", "message"),
    [
        ({"image": [b"this is not an image"]}, None, "row 0: image: unreadable image"),
        ({"image": [b""]}, None, "row 0: image: empty image"),
        ({"tokens": [[[0.5, 0.25]]]}, None, "row 0: tokens: shape [1, 2], expected [n, 64]"),
        ({"tokens": [[[0.5] * 64] * 7]}, None, "n = 7 rows and no layout"),
        ({"tokens": [[[0.5] * 64] * 8], "grid": [[3, 3]]}, None, "[3, 3] has 9 cells"),
        ({"image": [_png(IMAGES[0])], "tokens": [[[0.5] * 64]]}, None, "both 'image' and"),
        ({"image": [_png(IMAGES[0])]}, {"rate": 0.5}, "serves rates [0.75, 0.75]"),
    ],
    ids=["not-an-image", "empty-image", "token-width", "token-count", "grid", "both", "rate"],
)
def test_bad_rows_are_refused_naming_what_is_wrong(loaded, rows, params, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        loaded.predict(pd.DataFrame(rows), params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 when served
    assert message in err.value.message


def test_no_rows_is_refused(loaded):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="no rows: the request holds no image"):
        loaded.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))


def test_folder_versions_keep_loading_and_are_repackaged(ws, tmp_path, monkeypatch):
    """A version registered as a plain checkpoint folder (before this format) still loads with
    mc_registry; the register stage run again on that checkpoint makes one pyfunc version of
    it, which takes the alias the folder held, and finds it on the next run."""
    root = tmp_path / "ws"
    for sub in ("models", "reports"):
        shutil.copytree(ws.root / sub, root / sub)
    shutil.copy(ws.root / "empty.db", root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv(mc_registry.ENV_URI, uri)
    monkeypatch.chdir(root)
    monkeypatch.setattr(common, "load_params", lambda sections, who: ws.params)
    name, ckpt = ws.record["name"], cells.compressor_dir(ARCH, RATE)
    # What the stage registered before: the folder, champion, with its lineage tags.
    run = tracking.start_cell_run(ws.params.tracking.experiment, ARCH, "0.75", params={})
    base_sha = lineage.checkpoint_hash(cells.base_dir(ARCH))
    tracking.register_checkpoint(
        name,
        ckpt,
        run_id=run,
        score=0.6,
        metric="acc_avg",
        tags={"base_sha256": base_sha},
        promote=True,
    )
    assert mc_registry.version_tags(name, "1").get(mlmodel.FORMAT_TAG) is None
    assert not mlmodel.is_model(mc_registry.download(f"models:/{name}/1", tmp_path / "v1"))
    from_folder = mc_registry.load_compressor(f"models:/{name}@champion")

    register.main(["--arch", ARCH, "--rate", str(RATE)])
    rec = json.loads(cells.cell_file("registry", ARCH, RATE).read_text())
    assert (rec["version"], rec["created"], rec["champion"], rec["repackages"]) == (
        "2",
        True,
        "2",
        "1",
    )
    assert "already is champion v1" in rec["gate"]["reason"]  # the gate had nothing to decide
    tags = mc_registry.version_tags(name, "2")
    assert tags[mlmodel.FORMAT_TAG] == mlmodel.FORMAT and tags["repackages"] == "1"
    from_model = mc_registry.load_compressor(f"models:/{name}@champion")
    for (k, a), (_, b) in zip(
        from_folder.state_dict().items(), from_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    # The next run finds the pyfunc version: nothing new, the alias stays.
    register.main(["--arch", ARCH, "--rate", str(RATE)])
    again = json.loads(cells.cell_file("registry", ARCH, RATE).read_text())
    assert (again["version"], again["created"], again["champion"]) == ("2", False, "2")
    assert again["repackages"] is None
    assert len(mc_registry.client(uri).search_model_versions(f"name = '{name}'")) == 2


def test_mlflow_models_serve_answers_embeddings_and_4xx(ws, reference, tmp_path):
    """``mlflow models serve`` of the champion: an image gives the embeddings; not an image,
    an empty body, no rows and a wrong token shape give a 400 naming the problem, and the
    server keeps serving."""
    model, processor, comp = reference
    image = IMAGES[0]
    emb = compress_image(model, processor, comp, image)
    want = emb.embeds
    log = tmp_path / "serve.log"
    with scoring.served(ws.record["uri"], tracking_uri=ws.uri, log=log) as url:
        status, body = scoring.invoke(url, scoring.image_request(_png(image)))
        assert status == 200, body
        (pred,) = body["predictions"]
        got = torch.tensor(pred["embeds"], dtype=torch.float32)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert (pred["n"], pred["m"], pred["grid_thw"]) == (emb.n, emb.m, None)
        # What the chat front end hands to vLLM (mc_vllm.inputs.content_part).
        served_emb = scoring.image_embeds(pred, family="llava")
        assert (served_emb.m, served_emb.n, served_emb.grid_thw) == (emb.m, emb.n, None)
        bad = {
            "not-an-image": (scoring.image_request(b"GIF89a but not really"), "unreadable image"),
            "empty-body": (b"", "valid JSON"),
            "no-rows": ({"dataframe_records": []}, "no rows"),
            "token-shape": (
                scoring.tokens_request([[0.5, 0.25]]),
                "shape [1, 2], expected [n, 64]",
            ),
        }
        for what, (request, message) in bad.items():
            status, body = scoring.invoke(url, request)
            assert 400 <= status < 500, (what, status, body)
            assert message in body["message"], (what, body)
        status, body = scoring.invoke(url, scoring.image_request(_png(image)))
        assert status == 200, body  # still serving
        torch.testing.assert_close(
            torch.tensor(body["predictions"][0]["embeds"]), want, atol=ATOL, rtol=RTOL
        )
