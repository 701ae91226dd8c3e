"""Serving path: compressed embeddings into vLLM give the answers transformers gives.

The main venv (transformers 5.23) builds tiny LLaVA and Qwen2-VL models with random weights,
trains a metacompress compressor a few deterministic steps, computes each image's compressed
embeddings with `mc_core.inference.serving.compress_image` and the reference answers of a 3-turn
dialogue
with the project's own `Conversation`. vLLM runs in its own venv (`make vllm-env`, transformers
< 5.20) in a subprocess (`python -m mc_vllm.replay`) fed the saved embeddings, the exported
model folder and the questions; its greedy answers must be the reference's.

The engine tests skip, saying how to build it, when `.venv-vllm` is absent. The format and
input-building tests run everywhere. Models are fp32: in bf16 greedy ties can flip.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_image
from safetensors import safe_open
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mc_core.compressors import build
from mc_core.inference.compress import compress_inputs
from mc_core.inference.conversation import Conversation
from mc_core.inference.dialogue import render
from mc_core.inference.embeds import ImageEmbeds, load_embeds, save_embeds
from mc_core.inference.serving import compress_image, engine_adapter, engine_grid, export_for_vllm
from mc_core.models.families import adapter_for
from mc_core.models.processors import build_processor
from mc_core.training.losses import answer_kl
from mc_vllm.inputs import chat_messages, content_part, multi_modal_data

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(
    not (ROOT / ".venv-vllm" / ".installed").is_file(),
    reason="vLLM venv absent: `make vllm-env` builds .venv-vllm (~90 s, ~3.5 GB)",
)

QUESTIONS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a square ?"]
TEXT = dict(  # head_dim 32: vLLM's CPU attention supports head sizes >= 32
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _finish(model, processor):
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor


def build_llava():
    """LLaVA-1.5 style: CLIP 64 px / patch 8 -> 64 visual tokens."""
    processor = build_processor("llava", VOCAB, image_size=64, patch_size=8)
    tok = processor.tokenizer
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **TEXT,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=64,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    return _finish(LlavaForConditionalGeneration(cfg), processor)


def build_qwen2_vl():
    """Qwen2-VL: patch 14, merge 2 -> an 8 x 8 grid of 64 tokens for a 224 px image."""
    processor = build_processor("qwen2_vl", VOCAB, min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    tok = processor.tokenizer
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
            # sum(mrope_section) == head_dim / 2; theta 10 makes the grid positions matter.
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10.0,
                "mrope_section": [4, 6, 6],
            },
            **TEXT,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    return _finish(Qwen2VLForConditionalGeneration(cfg), processor)


CASES = {
    # family: (builder, image side in px, rate); m = ceil((1 - rate) n)
    "llava": (build_llava, 64, 0.75),  # n = 64 -> m = 16
    "qwen2_vl": (build_qwen2_vl, 224, 0.75),  # n = 64 (8 x 8) -> m = 16 on a 4 x 4 grid
}


def train_compressor(model, processor, rate: float, images, *, steps: int = 6):
    """A metacompress compressor after `steps` Adam steps on the answer KL (deterministic)."""
    torch.manual_seed(0)
    model.requires_grad_(False)
    dim = int(model.config.get_text_config().hidden_size)
    comp = build("metacompress", rate=rate, dim=dim)
    before = [p.detach().clone() for p in comp.parameters()]
    adapter = engine_adapter(model)
    opt = torch.optim.Adam(comp.parameters(), lr=0.05)
    for step in range(steps):
        text = render(processor, [QUESTIONS[step % 3]], [], n_images=1)
        inputs = dict(
            processor(text=[text], images=[images[step % len(images)]], return_tensors="pt")
        )
        adapter.reset_state()
        with torch.no_grad():
            full = model(**inputs).logits[0, -1:]
        comp_inputs, _, _ = compress_inputs(model, adapter, comp, inputs)
        adapter.reset_state()
        loss = answer_kl(full, model(**comp_inputs).logits[0, -1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = sum(
        float((p.detach() - b).abs().max()) for p, b in zip(comp.parameters(), before, strict=True)
    )
    assert moved > 0, "training did not change the compressor"
    return comp.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The shared 2-core machine: one torch thread per process (see conftest.one_thread).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- format and inputs (no engine) --------------------------------------------------------------


def test_engine_grid_matches_m_and_aspect():
    assert engine_grid(16, (8, 8), 2) == (1, 8, 8)  # 4 x 4 merged tokens
    assert engine_grid(7, (8, 8), 2) in {(1, 2, 14), (1, 14, 2)}  # a prime m: a 1 x 7 strip
    t, h, w = engine_grid(12, (6, 12), 2)  # a wide image keeps a wide grid (2 x 6 or 3 x 4)
    assert h * w // 4 == 12 and w > h
    with pytest.raises(ValueError, match="m=0"):
        engine_grid(0, (8, 8), 2)


def test_embeds_round_trip(tmp_path):
    emb = ImageEmbeds(
        torch.randn(5, 8), family="qwen2_vl", n=20, grid_thw=(1, 2, 10), meta={"model": "x"}
    )
    path = save_embeds(emb, tmp_path / "e.safetensors")
    back = load_embeds(path)
    assert torch.equal(back.embeds, emb.embeds) and back.grid_thw == (1, 2, 10)
    assert (back.family, back.n, back.m, back.meta["model"]) == ("qwen2_vl", 20, 5, "x")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_embeds(tmp_path / "bad.safetensors")


def test_engine_inputs_shapes():
    llava = ImageEmbeds(torch.randn(16, 64), family="llava", n=64)
    assert multi_modal_data(llava)["image"].shape == (1, 16, 64)  # 3-D: one image of m tokens
    qwen = ImageEmbeds(torch.randn(16, 64), family="qwen2_vl", n=64, grid_thw=(1, 8, 8))
    item = multi_modal_data(qwen)["image"]
    assert item["image_embeds"].shape == (16, 64)
    assert item["image_grid_thw"].tolist() == [[1, 8, 8]]
    part = content_part(qwen)
    assert part["type"] == "image_embeds" and part["image_embeds"]["image_grid_thw"] == [1, 8, 8]
    back = torch.load(
        io.BytesIO(base64.b64decode(part["image_embeds"]["image_embeds"])), weights_only=True
    )  # what the server does with it
    assert torch.equal(back, qwen.embeds)
    msgs = chat_messages(QUESTIONS[:2], ["red"], part)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"][0] is part and len(msgs[2]["content"]) == 1


@pytest.mark.parametrize("family", sorted(CASES))
def test_compress_image_equals_conversation_tokens(family):
    builder, side, rate = CASES[family]
    model, processor = builder()
    comp = build("metacompress", rate=rate, dim=64)
    image = make_image(side, side, seed=1)
    emb = compress_image(model, processor, comp, image)
    conv = Conversation(model, processor, comp, images=[image], adapter=engine_adapter(model))
    conv.ask(QUESTIONS[0])
    assert emb.m == conv.visual_tokens[0] == 16 and emb.n == 64
    assert torch.equal(emb.embeds, conv.tokens[0].cpu())  # one code path: bit-identical
    if family == "qwen2_vl":
        assert emb.grid_thw == (1, 8, 8)
    with pytest.raises(ValueError, match="prompt-dependent"):
        compress_image(model, processor, build("fastv", rate=rate, dim=64), image)


def test_export_renames_llava_tower_and_stock_processor(tmp_path):
    model, processor = build_llava()
    export_for_vllm(model, processor, tmp_path / "llava")
    with safe_open(str(tmp_path / "llava" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    tower = [k for k in keys if "vision_tower" in k]
    assert tower and all(".vision_tower.vision_model." in "." + k for k in tower)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # transformers still reads the renamed layout
    model, processor = build_qwen2_vl()
    export_for_vllm(model, processor, tmp_path / "qwen")
    cfg = json.loads((tmp_path / "qwen" / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2VLProcessor"


# --- vLLM equivalence --------------------------------------------------------------------------


def _replay(spec: dict, tmp_path: Path) -> dict:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MC_VLLM_SERVER_LOG": str(tmp_path / "server.log"),
    }
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [
            str(VLLM_PY),
            "-m",
            "mc_vllm.replay",
            str(tmp_path / "spec.json"),
            str(tmp_path / "out.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        log = tmp_path / "server.log"
        extra = log.read_text()[-3000:] if log.is_file() else ""
        pytest.fail(f"mc_vllm.replay failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{extra}")
    return json.loads((tmp_path / "out.json").read_text())


def _reference(family: str, tmp_path: Path, n_dialogues: int):
    """Tiny model exported for vLLM, trained compressor, saved embeddings, reference dialogues."""
    builder, side, rate = CASES[family]
    model, processor = builder()
    images = [make_image(side, side, seed=s) for s in range(n_dialogues)]
    comp = train_compressor(model, processor, rate, images)
    export_for_vllm(model, processor, tmp_path / "model")
    dialogues, refs = [], []
    for i, image in enumerate(images):
        emb = compress_image(model, processor, comp, image)
        save_embeds(emb, tmp_path / f"img{i}.safetensors")
        conv = Conversation(
            model, processor, comp, images=[image], adapter=engine_adapter(model), max_new_tokens=4
        )
        for q in QUESTIONS:
            conv.ask(q)
        assert torch.equal(emb.embeds, conv.tokens[0].cpu())
        dialogues.append({"embeds": str(tmp_path / f"img{i}.safetensors"), "questions": QUESTIONS})
        refs.append(conv)
    return dialogues, refs, (model, processor, comp, images)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_vllm_offline_matches_conversation(family, tmp_path):
    dialogues, refs, (model, processor, comp, images) = _reference(family, tmp_path, 2)
    out = _replay(
        {
            "model": str(tmp_path / "model"),
            "mode": "offline",
            "max_tokens": 4,
            "engine": {"enforce_eager": True},
            "dialogues": dialogues,
        },
        tmp_path,
    )
    worst = 0.0
    for ref, got in zip(refs, out["dialogues"], strict=True):
        assert got["answers"] == ref.answers
        # Same prompt length at every turn: the text plus m (not n) image tokens.
        assert got["prompt_tokens"] == ref.cache_tokens
        for k in range(len(QUESTIONS)):
            logp = torch.log_softmax(ref.first_logits[k], -1)
            assert got["token_ids"][k][0] == int(logp.argmax())
            top = {int(t): v for t, v in got["first_logprobs"][k].items()}
            assert len(top) >= 5
            worst = max(worst, *(abs(v - float(logp[t])) for t, v in top.items()))
    # fp32 on both sides; vLLM's CPU kernels sum in another order than transformers' (measured
    # 2.4e-7 here), so 1e-5 is an order of magnitude above rounding, far below the effects below.
    tol = 1e-5
    assert worst < tol
    print(
        f"{family}: largest |log-prob vLLM - transformers| {worst:.1e}, vLLM engine start "
        f"{out['engine_start_s']:.0f} s, 3 turns x 2 dialogues {out['run_s']:.1f} s"
    )
    # The dialogues say something: not every turn is an immediate end-of-turn.
    assert any(a for ref in refs for a in ref.answers)
    # The comparison tells the two images apart, so vLLM really used each one's tokens.
    top0 = [int(t) for t in out["dialogues"][0]["first_logprobs"][0]]
    lp = [torch.log_softmax(ref.first_logits[0], -1)[top0] for ref in refs]
    assert float((lp[0] - lp[1]).abs().max()) > 10 * tol
    if family == "qwen2_vl":
        # Positions matter in this model: the adapter's "source" placement (P-weighted source
        # positions, which no grid sent to an engine can express) moves the same log-probs by
        # far more than the tolerance, so agreeing with vLLM pins the packed grid down.
        src = Conversation(
            model,
            processor,
            comp,
            images=[images[0]],
            adapter=adapter_for(model, positions="source"),
        )
        src.ask(QUESTIONS[0])
        shift = torch.log_softmax(src.first_logits[0], -1)[top0] - lp[0]
        print(
            f"qwen2_vl: source vs packed positions move the top log-probs by "
            f"{float(shift.abs().max()):.1e}"
        )
        assert float(shift.abs().max()) > 10 * tol


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_vllm_server_matches_conversation(family, tmp_path):
    # The image_embeds content part: LLaVA a base64 tensor, Qwen also its grid as an array.
    dialogues, refs, _ = _reference(family, tmp_path, 1)
    out = _replay(
        {
            "model": str(tmp_path / "model"),
            "mode": "server",
            "max_tokens": 4,
            "server": {"enforce_eager": True},
            "dialogues": dialogues,
        },
        tmp_path,
    )
    (got,) = out["dialogues"]
    assert got["answers"] == refs[0].answers
    assert got["prompt_tokens"] == refs[0].cache_tokens
