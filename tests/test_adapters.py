"""Adapters on tiny random LVLMs of every family: exactness, multi-turn cache reuse, batches,
generation, contexts, FastV scores and training through the frozen model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, TINY, assistant_turn, make_image, user_turn
from transformers import DynamicCache

from mc_core.models import families
from mc_core.models.adapters import POSITIONS
from mc_core.models.adapters.placeholders import rewrite_placeholders
from mc_core.models.adapters.prompt_attention import prompt_attention, prompt_embeddings
from mc_core.models.adapters.qwen2_vl import Qwen2VLAdapter, factor_grid
from mc_core.models.families import adapter_for, available

# Two image sizes per family, chosen so the token counts differ where the family allows it
# (the default suits the 28-pixel token units of the Qwen test models).
SIZES = {
    "llava": [(40, 72), (72, 40)],
    "llava_next": [(40, 72), (64, 60)],
    "internvl": [(64, 150), (60, 60)],
}
DEFAULT_SIZES = [(56, 112), (84, 84)]
DIALOGUE = [
    user_turn("what colour is at row 2 col 3 ?", images=1),
    assistant_turn("red"),
    user_turn("what shape is at row 1 col 1 ?"),
    assistant_turn("circle"),
    user_turn("how many blue ?"),
]


@pytest.fixture(autouse=True)
def _no_grad_by_default():
    with torch.no_grad():
        yield


def images_of(family: str, count: int = 1, offset: int = 0):
    sizes = SIZES.get(family, DEFAULT_SIZES)
    return [make_image(*sizes[(i + offset) % 2], seed=i + offset) for i in range(count)]


def encode(processor, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=images, text=[text], return_tensors="pt")


def pool(x: torch.Tensor, m: int) -> torch.Tensor:
    """Average contiguous chunks: [n, d] -> [m, d] (a convex P, independent of mc_core)."""
    group = torch.arange(x.shape[0]) * m // x.shape[0]  # (n,) chunk of each token
    out = torch.zeros(m, x.shape[1], dtype=x.dtype).index_add_(0, group, x)
    return out / torch.bincount(group, minlength=m).to(x.dtype)[:, None]


def pool_p(n: int, m: int) -> torch.Tensor:
    """The [m, n] P of `pool` (row j averages chunk j)."""
    group = torch.arange(n) * m // n
    P = torch.zeros(m, n).index_put_((group, torch.arange(n)), torch.ones(n))
    return P / P.sum(1, keepdim=True)


def fresh_logits(model, adapter, inputs):
    adapter.reset_state()
    return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("with_p", [False, True])
@pytest.mark.parametrize("positions", POSITIONS)
def test_identity_tokens_give_the_untouched_logits(tiny, family, n_images, with_p, positions):
    model, proc = tiny(family)
    adapter = adapter_for(model, positions=positions)
    turn = user_turn("what colour is at row 2 col 3 ?", images=n_images)
    inputs = encode(proc, [turn], images_of(family, n_images))
    reference = fresh_logits(model, adapter, inputs)
    tokens = adapter.visual_tokens(inputs)
    assert len(tokens) == n_images
    assert [t.shape[0] for t in tokens] == adapter.placeholder_counts(inputs)
    P = [torch.eye(t.shape[0]) for t in tokens] if with_p else None
    d = adapter.inputs_with(inputs, tokens, P=P)
    assert ("position_ids" in d) == (with_p and positions == "source")
    got = fresh_logits(model, adapter, d)
    # Same ops on the same values in the same order: bit-identical, not merely close.
    assert got.shape == reference.shape
    assert (got - reference).abs().max().item() == 0.0


def _last_used_plus_one(pos: torch.Tensor, at: int) -> None:
    """Position(s) at sequence index `at` continue right after the largest one before it."""
    pos = pos[0] if pos.dim() == 2 else pos[:, 0]  # (L,) or (3, L)
    before = pos[..., :at].amax(dim=-1)
    assert torch.equal(pos[..., at], before + 1), (pos[..., at], before)


# m = None: a third of the tokens. Qwen packed with m = 5 on a 2 x 4 grid: no grid fits (1 x 5 is
# 2.5x too wide), so the 1-D text-position fallback is exercised too. Under "source" the cached
# turns rely on the rope_deltas the adapter's hook derives from the explicit positions.
@pytest.mark.parametrize(
    "family,m,positions",
    [(f, None, p) for f in FAMILIES for p in POSITIONS]
    + [(f, 5, p) for f in ("qwen2_vl", "qwen2_5_vl") for p in POSITIONS],
)
def test_cached_multiturn_equals_from_scratch(tiny, family, m, positions):
    model, proc = tiny(family)
    adapter = adapter_for(model, positions=positions)
    images = images_of(family)
    first = encode(proc, DIALOGUE[:1], images)
    x = adapter.visual_tokens(first)
    ms = [m or math.ceil(t.shape[0] / 3) for t in x]
    tokens = [pool(t, k) for t, k in zip(x, ms, strict=True)]
    P = [pool_p(t.shape[0], k) for t, k in zip(x, ms, strict=True)]
    adapter.reset_state()
    cache = DynamicCache()
    d = adapter.inputs_with(first, tokens, P=P)
    parts = [model(**d, past_key_values=cache, use_cache=True).logits]
    seen = d["input_ids"]
    boundaries = []
    for k in (3, 5):  # turns 2 and 3 as text-only chunks over the reused cache
        d = adapter.inputs_with(encode(proc, DIALOGUE[:k], images), tokens, P=P)
        assert torch.equal(d["input_ids"][:, : seen.shape[1]], seen), "prefix property broken"
        chunk = d["input_ids"][:, seen.shape[1] :]
        parts.append(model(input_ids=chunk, past_key_values=cache, use_cache=True).logits)
        boundaries.append(seen.shape[1])
        seen = d["input_ids"]
    if m == 5 and positions == "packed":
        assert "image_grid_thw" not in d and not d["mm_token_type_ids"].any()
    assert ("position_ids" in d) == (positions == "source")
    if positions == "source":
        # A later turn starts right after the last position used (not at the cache length).
        for at in boundaries:
            _last_used_plus_one(d["position_ids"], at)
    cached = torch.cat(parts, dim=1)
    scratch = fresh_logits(model, adapter, d)
    # Chunked attention sums keys in a different grouping than one pass: float32 rounding only.
    torch.testing.assert_close(cached, scratch, atol=1e-5, rtol=0)


def test_source_and_packed_positions_differ_where_tokens_move(tiny):
    """The option matters: with fewer tokens, 1-D "source" keeps the text's uncompressed
    positions, "packed" moves it; the logits differ."""
    model, proc = tiny("llava")
    inputs = encode(proc, DIALOGUE[:1], images_of("llava"))
    packed, source = (adapter_for(model, positions=p) for p in POSITIONS)
    x = packed.visual_tokens(inputs)
    n = x[0].shape[0]
    keep = torch.tensor([0, 9, 20, 63])  # a one-hot P: these tokens, in this order
    P = [torch.zeros(4, n).index_put_((torch.arange(4), keep), torch.ones(4))]
    y = [x[0][keep]]
    d_packed = packed.inputs_with(inputs, y, P=P)
    d_source = source.inputs_with(inputs, y, P=P)
    assert "position_ids" not in d_packed
    pos = d_source["position_ids"][0]  # (L',)
    image = d_source["input_ids"][0] == source.image_token_id
    start = int((inputs["input_ids"][0] == source.image_token_id).nonzero()[0])
    assert torch.equal(pos[image], keep.float() + start)  # the kept tokens' own positions
    after = int(image.nonzero()[-1]) + 1
    assert float(pos[after]) == start + n  # text after the image: its uncompressed position
    assert torch.equal(pos[:start], torch.arange(start, dtype=torch.float32))
    a = fresh_logits(model, packed, d_packed)
    b = fresh_logits(model, source, d_source)
    assert (a - b).abs().max() > 1e-3


def test_position_gradients_reach_the_positions_not_the_rotary(tiny):
    """P-weighted positions are differentiable w.r.t. P; transformers' rotary embeddings run
    under torch.no_grad (5.23), so the graph stops there: documented, and flagged if it
    changes."""
    for family in ("llava", "qwen2_vl"):
        model, proc = tiny(family)
        adapter = adapter_for(model, positions="source")
        inputs = encode(proc, DIALOGUE[:1], images_of(family))
        x = adapter.visual_tokens(inputs)
        m = math.ceil(x[0].shape[0] / 4)
        with torch.enable_grad():
            raw = torch.randn(m, x[0].shape[0], requires_grad=True)
            P = [raw.softmax(dim=1)]
            d = adapter.inputs_with(inputs, [pool(x[0], m)], P=P)
            pos = d["position_ids"]
            assert pos.requires_grad
            (grad,) = torch.autograd.grad(pos.sum(), raw)
            assert grad.abs().sum() > 0
            adapter.reset_state()
            logits = model(**d).logits  # tokens carry no graph: only positions could
            (through,) = torch.autograd.grad(logits.sum(), raw, allow_unused=True)
            assert through is None, f"{family}: rotary now passes gradients to P"


def test_positions_option_errors(tiny):
    model, proc = tiny("llava")
    with pytest.raises(ValueError, match="positions='nearest'"):
        adapter_for(model, positions="nearest")
    adapter = adapter_for(model, positions="source")
    assert adapter.positions == "source" and adapter_for(model).positions == "packed"
    inputs = encode(proc, DIALOGUE[:1], images_of("llava"))
    x = adapter.visual_tokens(inputs)
    with pytest.raises(ValueError, match="P is None"):
        adapter.inputs_with(inputs, [pool(x[0], 3)])
    # Identity without P is the untouched layout: no P needed.
    assert "position_ids" not in adapter.inputs_with(inputs, x)
    qwen, _ = tiny("qwen2_vl")
    assert adapter_for(qwen).positions == families.get("qwen2_vl").positions == "source"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_generate_with_fewer_tokens(tiny, family, positions):
    model, proc = tiny(family)
    adapter = adapter_for(model, positions=positions)
    inputs = encode(proc, DIALOGUE[:1], images_of(family))
    x = adapter.visual_tokens(inputs)
    tokens = [pool(t, max(1, t.shape[0] // 4)) for t in x]
    P = [pool_p(t.shape[0], y.shape[0]) for t, y in zip(x, tokens, strict=True)]
    d = adapter.inputs_with(inputs, tokens, P=P)
    n_before = int((inputs["input_ids"] == adapter.image_token_id).sum())
    assert int((d["input_ids"] == adapter.image_token_id).sum()) == tokens[0].shape[0] < n_before
    first_token = fresh_logits(model, adapter, d)[0, -1].argmax()
    adapter.reset_state()
    out = model.generate(**d, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, d["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : d["input_ids"].shape[1]], d["input_ids"])
    assert out[0, d["input_ids"].shape[1]] == first_token  # greedy step 1 = forward argmax


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_batch_of_two_dialogues_with_padding(tiny, family, positions):
    model, proc = tiny(family)
    adapter = adapter_for(model, positions=positions)
    dialogues = [DIALOGUE[:1], [user_turn("how many red circle are there ?", images=1)]]
    images = [images_of(family)[0], images_of(family, offset=1)[0]]
    texts = [
        proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in dialogues
    ]
    batch = proc(images=images, text=texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the two prompts should need padding"
    x = adapter.visual_tokens(batch)
    tokens = [pool(t, math.ceil(t.shape[0] / 3)) for t in x]
    P = [pool_p(t.shape[0], y.shape[0]) for t, y in zip(x, tokens, strict=True)]
    d = adapter.inputs_with(batch, tokens, P=P)
    assert d["attention_mask"][:, -1].all()  # still left padded
    batched = fresh_logits(model, adapter, d)[:, -1]
    for b in range(2):
        single = encode(proc, dialogues[b], [images[b]])
        alone = fresh_logits(model, adapter, adapter.inputs_with(single, [tokens[b]], P=[P[b]]))
        alone = alone[0, -1]
        # Padded rows attend over masked slots: float32 summation differs slightly.
        torch.testing.assert_close(batched[b], alone, atol=1e-5, rtol=0)
    adapter.reset_state()
    out = model.generate(**d, max_new_tokens=2, do_sample=False, min_new_tokens=2)
    assert out.shape == (2, d["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_contexts_fit_the_tokens(tiny, family):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    inputs = encode(proc, [user_turn("what ?", images=2)], images_of(family, 2))
    tokens = adapter.visual_tokens(inputs)
    plain = adapter.contexts(inputs)
    full = adapter.contexts(inputs, frozenset({"cls_attention", "keys"}))
    for x, c0, c in zip(tokens, plain, full, strict=True):
        n = x.shape[0]
        c.check(n)
        assert c0.cls_attention is None and c0.keys is None
        assert torch.equal(c0.positions, c.positions)
        assert c.positions.shape == (n, 2)
        assert c.positions.min() >= 0 and c.positions.max() <= 1
        # Tokens spread over the image, not collapsed to a point.
        assert c.positions[:, 0].std() > 0.1 and c.positions[:, 1].std() > 0.1
        if c.grid is not None:
            h, w = c.grid
            assert h * w == n
        assert c.cls_attention.shape == (n,) and (c.cls_attention >= 0).all()
        assert c.keys.shape[0] == n and torch.isfinite(c.keys).all()
        assert c.cls_attention.std() > 0  # a real signal, not a constant


def test_llava_cls_attention_and_keys_match_eager_tower():
    model, proc = TINY["llava"]()
    adapter = adapter_for(model)
    inputs = encode(proc, [user_turn("what ?", images=1)], images_of("llava"))
    ctx = adapter.contexts(inputs, frozenset({"cls_attention", "keys"}))[0]
    model.set_attn_implementation({"vision_config": "eager"})
    out = model.model.vision_tower(
        inputs["pixel_values"], output_attentions=True, output_hidden_states=True
    )
    # Feature layer -2 of a 2-layer tower = output of layer 0.
    eager = out.attentions[0][0, :, 0, 1:].mean(0)  # (P,) CLS row, heads averaged
    torch.testing.assert_close(ctx.cls_attention, eager, atol=1e-6, rtol=1e-5)
    layer = model.model.vision_tower.encoder.layers[0]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[0]))[0, 1:]
    torch.testing.assert_close(ctx.keys, keys)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_received_attention_reproduces_the_last_block(tiny, family):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    inputs = encode(proc, [user_turn("what ?", images=2)], images_of(family, 2))
    probs, v, h_in, h_out = adapter._last_block_attention(inputs)
    block = model.model.visual.blocks[-1]
    outs = []
    for p, vi in zip(probs, v, strict=True):  # (H, S, S), (H, S, dh)
        outs.append((p @ vi.float()).transpose(0, 1).flatten(1))
    attn_out = block.attn.proj(torch.cat(outs).to(h_in.dtype))
    y = h_in + attn_out
    y = y + block.mlp(block.norm2(y))
    # If the recomputed attention (q, k, rotary, image split, window order) were wrong, the
    # block output would not match the tower's own.
    torch.testing.assert_close(y, h_out, atol=1e-5, rtol=1e-4)


def test_qwen_positions_grid_or_text_fallback(tiny):
    model, proc = tiny("qwen2_vl")
    adapter = adapter_for(model, positions="packed")
    assert factor_grid(8, 2, 4)[:2] == (2, 4)
    assert factor_grid(7, 4, 4)[2] > Qwen2VLAdapter.max_aspect_error  # 1 x 7: falls back
    inputs = encode(proc, [user_turn("what ?", images=2)], images_of("qwen2_vl", 2))
    x = adapter.visual_tokens(inputs)
    assert adapter.contexts(inputs)[0].grid == (2, 4) and x[1].shape[0] == 9
    d = adapter.inputs_with(inputs, [pool(x[0], 2), pool(x[1], 7)])
    # Image 0: 2 tokens as 1 x 2, the 2 x 4 grid's aspect; image 1: 1 x 7 is too stretched.
    assert d["image_grid_thw"].tolist() == [[1, 2, 4]]
    image = d["input_ids"] == adapter.image_token_id
    assert int(image.sum()) == 9
    assert int(d["mm_token_type_ids"][image].sum()) == 2  # the 7 fallback tokens are text
    logits = fresh_logits(model, adapter, d)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_from_p(tiny, family):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    inputs = encode(proc, [user_turn("what ?", images=2)], images_of(family, 2))
    x = adapter.visual_tokens(inputs)
    orig, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # (3, 1, L)
    is_image = inputs["input_ids"][0] == adapter.image_token_id
    src = orig[:, 0, is_image].float()  # (3, n_0 + n_1), image 0 then image 1
    n0 = x[0].shape[0]
    # One-hot P (a sampled subset, out of order) for image 0; a pooling P (7: no grid) for 1.
    keep = torch.tensor([5, 0, 3])
    P0 = torch.zeros(3, n0).index_put_((torch.arange(3), keep), torch.ones(3))
    P1 = pool_p(x[1].shape[0], 7)
    d = adapter.inputs_with(inputs, [x[0][keep], pool(x[1], 7)], P=[P0, P1])
    pos = d["position_ids"][:, 0]  # (3, L')
    image = d["input_ids"][0] == adapter.image_token_id
    got = pos[:, image]  # (3, 10)
    assert torch.equal(got[:, :3], src[:, keep])  # one-hot: exactly the kept tokens' positions
    torch.testing.assert_close(got[:, 3:], src[:, n0:] @ P1.T)  # float32 matmul rounding
    # Text keeps its positions: after the images it continues from the uncompressed maximum.
    text_out = pos[:, ~image]
    assert torch.equal(text_out, orig[:, 0, ~is_image].float())
    # A forward with these positions sets rope_deltas so the next position is max + 1.
    fresh_logits(model, adapter, d)
    delta = model.model.rope_deltas
    assert delta.shape == (1, 1)
    assert float(delta) == float(pos.max()) + 1 - d["input_ids"].shape[1]


def test_bad_p_is_rejected(tiny):
    model, proc = tiny("qwen2_vl")
    adapter = adapter_for(model)
    inputs = encode(proc, DIALOGUE[:1], images_of("qwen2_vl"))
    x = adapter.visual_tokens(inputs)
    y = [pool(x[0], 3)]
    with pytest.raises(ValueError, match=r"P\[0\] has shape"):
        adapter.inputs_with(inputs, y, P=[torch.ones(3, x[0].shape[0] + 1)])
    with pytest.raises(ValueError, match="P must be a list of 1"):
        adapter.inputs_with(inputs, y, P=[])


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_attention_scores(tiny, family):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    images = images_of(family, 2)
    inputs = encode(proc, [user_turn("what colour is at row 2 col 3 ?", images=2)], images)
    before = model.config.text_config._attn_implementation
    scores = prompt_attention(model, adapter, inputs, layer=1)
    assert model.config.text_config._attn_implementation == before
    counts = adapter.placeholder_counts(inputs)
    assert [s.shape for s in scores] == [(n,) for n in counts]
    for s in scores:
        assert (s >= 0).all() and s.sum() <= 1 + 1e-5  # a share of softmax rows
    other = encode(proc, [user_turn("how many blue square ?", images=2)], images)
    changed = prompt_attention(model, adapter, other, layer=1)
    assert not torch.allclose(scores[0], changed[0])  # prompt-dependent by construction


def full_depth_scores(model, adapter, inputs, layer: int) -> list[torch.Tensor]:
    """FastV scores the slow way: every LLM layer, eager, `output_attentions=True`; the row's
    last valid token is the query (FastV's own choice)."""
    cfg = model.config.text_config
    before = cfg._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        adapter.reset_state()
        attn = model(**inputs, output_attentions=True, use_cache=False).attentions[layer]
    finally:
        model.set_attn_implementation({"text_config": before})
        adapter.reset_state()
    counts = adapter.placeholder_counts(inputs)
    _, slots = rewrite_placeholders(
        inputs, adapter.image_token_id, counts, counts, pad_token_id=adapter._pad_token_id()
    )
    mask = inputs["attention_mask"].bool()
    out = []
    for s in slots:
        last = int(mask[s.row].nonzero().max())
        out.append(attn[s.row, :, last, s.start : s.start + s.count].float().mean(dim=0))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])
def test_prompt_attention_matches_the_full_depth_forward(tiny, family, layer):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    inputs = encode(
        proc, [user_turn("what colour is at row 2 col 3 ?", images=2)], images_of(family, 2)
    )
    decoder = model.get_decoder()
    layers, depth = decoder.layers, model.config.text_config.num_hidden_layers
    reference = full_depth_scores(model, adapter, inputs, layer)
    got = prompt_attention(model, adapter, inputs, layer=layer)
    given = prompt_attention(
        model, adapter, inputs, layer=layer, visual_tokens=adapter.visual_tokens(inputs)
    )
    # Layers 0..K run the same ops on the same values as the full forward; 1e-6 leaves room
    # only for float32 reduction-order noise on scores of order 1/n.
    for r, a, b in zip(reference, got, given, strict=True):
        assert a.dtype == torch.float32
        assert (a - r).abs().max().item() <= 1e-6
        assert (b - r).abs().max().item() <= 1e-6
    assert decoder.layers is layers and len(layers) == depth == 2
    assert model.config.text_config.num_hidden_layers == depth


def test_prompt_attention_skips_the_vision_tower_when_given_tokens(tiny, monkeypatch):
    model, proc = tiny("llava")
    adapter = adapter_for(model)
    inputs = encode(proc, DIALOGUE[:1], images_of("llava"))
    x = adapter.visual_tokens(inputs)

    def no_tower(*args, **kwargs):
        raise AssertionError("vision tower ran although visual_tokens were given")

    monkeypatch.setattr(adapter, "visual_tokens", no_tower)
    monkeypatch.setattr(model.model.vision_tower, "forward", no_tower)
    scores = prompt_attention(model, adapter, inputs, layer=0, visual_tokens=x)
    assert [s.shape[0] for s in scores] == [t.shape[0] for t in x]
    with pytest.raises(ValueError, match=r"visual_tokens have \[32\] rows.*\[64\]"):
        prompt_attention(model, adapter, inputs, layer=0, visual_tokens=[x[0][:32]])


def test_prompt_attention_restores_the_model_on_error(monkeypatch):
    model, proc = TINY["llava"]()
    adapter = adapter_for(model)
    inputs = encode(proc, DIALOGUE[:1], images_of("llava"))
    cfg = model.config.text_config
    before = cfg._attn_implementation
    decoder = model.get_decoder()
    layers = decoder.layers
    seen = {}

    def boom(*args, **kwargs):
        seen.update(
            attn=cfg._attn_implementation, depth=cfg.num_hidden_layers, run=len(decoder.layers)
        )
        raise RuntimeError("forward failed")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        prompt_attention(model, adapter, inputs, layer=0)
    assert seen == {"attn": "eager", "depth": 1, "run": 1}  # truncated during the call
    assert cfg._attn_implementation == before != "eager"
    assert decoder.layers is layers and len(layers) == cfg.num_hidden_layers == 2
    assert all(layers[i] is decoder.layers[i] for i in range(2))
    with pytest.raises(ValueError, match=r"layer=2 .*2 layers \(0\.\.1\)"):
        prompt_attention(model, adapter, inputs, layer=2)
    with pytest.raises(ValueError, match="layer=-1"):
        prompt_attention(model, adapter, inputs, layer=-1)


def test_for_model_and_bad_tokens(tiny):
    assert available() == families.available() == FAMILIES
    assert {"internvl", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(available())
    with pytest.raises(ValueError, match="Linear.*internvl.*LlavaForConditionalGeneration"):
        adapter_for(torch.nn.Linear(2, 2))
    model, proc = tiny("llava")
    adapter = adapter_for(model)
    assert adapter.family == "llava"
    inputs = encode(proc, DIALOGUE[:1], images_of("llava"))
    x = adapter.visual_tokens(inputs)
    with pytest.raises(ValueError, match="1 images"):
        adapter.inputs_with(inputs, x + x)
    with pytest.raises(ValueError, match=r"tokens\[0\] has shape \(64, 3\)"):
        adapter.inputs_with(inputs, [x[0][:, :3]])
    with pytest.raises(ValueError, match="cls_attn"):
        adapter.contexts(inputs, frozenset({"cls_attn"}))
    assert adapter.contexts(inputs, frozenset({"prompt_attention"}))[0].prompt_attention is None
    with pytest.raises(ValueError, match="at least one token"):
        adapter.inputs_with(inputs, [x[0][:0]])


def test_rewrite_splits_touching_runs_by_counts():
    ids = torch.tensor([[5, 9, 9, 9, 9, 9, 6]])  # two images' runs touching: 2 + 3 placeholders
    out, slots = rewrite_placeholders({"input_ids": ids}, 9, [2, 3], [1, 2], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 9, 9, 9, 6]]
    assert [(s.start, s.count) for s in slots] == [(1, 1), (2, 2)]
    with pytest.raises(ValueError, match="placeholders"):
        rewrite_placeholders({"input_ids": ids}, 9, [2, 2], [1, 1], pad_token_id=0)


def test_metacompress_trains_through_the_frozen_lvlm(tiny):
    compressors = pytest.importorskip("mc_core.compressors")
    if "metacompress" not in compressors.available():
        pytest.skip("metacompress not registered yet")
    model, proc = TINY["llava"]()
    model.requires_grad_(False)
    adapter = adapter_for(model)
    inputs = encode(proc, DIALOGUE[:1], images_of("llava"))
    x = adapter.visual_tokens(inputs)
    gen = compressors.build("metacompress", rate=0.75, dim=adapter.dim)
    ctx = adapter.contexts(inputs, gen.needs)
    with torch.enable_grad():
        teacher = fresh_logits(model, adapter, inputs)[0, -1].log_softmax(-1)
        y, _ = gen(x, ctx)
        student = fresh_logits(model, adapter, adapter.inputs_with(inputs, y))[0, -1].log_softmax(
            -1
        )
        loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")
        loss.backward()
    trainable = [p for p in gen.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in model.parameters())


# Grid (llava), packed non-grid (llava_next) and CLS-free (qwen2_vl) contexts; the other
# families' contexts are checked in test_contexts_fit_the_tokens.
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_every_registered_compressor_runs_through_the_adapter(tiny, family):
    compressors = pytest.importorskip("mc_core.compressors")
    model, proc = tiny(family)
    adapter = adapter_for(model)
    inputs = encode(
        proc, [user_turn("what colour is at row 2 col 3 ?", images=2)], images_of(family, 2)
    )
    x = adapter.visual_tokens(inputs)
    ctx = adapter.contexts(inputs, frozenset({"cls_attention", "keys"}))
    for c, s in zip(ctx, prompt_attention(model, adapter, inputs, layer=1), strict=True):
        c.prompt_attention = s
    for c, e in zip(ctx, prompt_embeddings(model, adapter, inputs), strict=True):
        c.prompt_embeddings = e
    for name in compressors.available():
        method = compressors.build(name, rate=0.5, dim=adapter.dim)
        y, P = method(x, ctx)
        kept = [t.shape[0] if name == "none" else math.ceil(t.shape[0] / 2) for t in x]
        assert [t.shape[0] for t in y] == kept, name
        assert [tuple(p.shape) for p in P] == [
            (m, t.shape[0]) for m, t in zip(kept, x, strict=True)
        ], name
        logits = fresh_logits(model, adapter, adapter.inputs_with(inputs, y, P=P))
        assert torch.isfinite(logits).all(), name


def test_llava_next_packed_order_and_context(tiny):
    model, proc = tiny("llava_next")
    adapter = adapter_for(model)
    inputs = encode(proc, [user_turn("what ?", images=1)], images_of("llava_next"))
    (index,) = adapter.index_maps(inputs)
    (x,) = adapter.visual_tokens(inputs)
    assert len(index) == x.shape[0]
    p = 16  # (32 / 8)^2 patches per tile
    assert torch.equal(index[:p], torch.arange(p))  # the base tile first, row-major
    crop = index[p:]
    lines = crop < 0
    # A 40 x 72 image goes on the 64 x 64 canvas (2 x 2 crops = 8 x 8 patches); unpadding the
    # letterboxed image keeps all 8 columns and the 4 middle rows (40 / 72 * 64 = 35.6 px).
    assert adapter._tiles(inputs) == [5]
    assert int(lines.sum()) == 4 and len(crop) == 4 * (8 + 1)
    assert lines.reshape(4, 9)[:, -1].all() and not lines.reshape(4, 9)[:, :-1].any()
    kept = crop[~lines] - p  # (32,) index among the crop tiles' patches
    tile, patch = kept // p, kept % p
    full_row = (tile // 2) * 4 + patch // 4  # row on the 8 x 8 crop grid
    assert sorted(set(full_row.tolist())) == [2, 3, 4, 5]
    # The newline token's own feature is the model's image_newline vector.
    torch.testing.assert_close(x[p + 8], model.model.image_newline.to(x.dtype))
    ctx = adapter.contexts(inputs, frozenset({"cls_attention"}))[0]
    assert ctx.grid is None
    assert (ctx.positions[p:][lines][:, 1] == 1.0).all()  # newlines sit at the row end
    assert (ctx.cls_attention[p:][lines] == 0).all()
    # Row-major crop positions: columns increase along a row, rows down the sequence.
    pos = ctx.positions[p:].reshape(4, 9, 2)[:, :-1]
    assert (pos[:, 1:, 1] > pos[:, :-1, 1]).all() and (pos[1:, :, 0] > pos[:-1, :, 0]).all()


def test_internvl_tiles_and_pixel_shuffle_groups(tiny):
    model, proc = tiny("internvl")
    adapter = adapter_for(model)
    groups = adapter._patch_groups(torch.device("cpu"))  # (16, 4) over an 8 x 8 patch tile
    rows, cols = groups // 8, groups % 8
    # Each token stacks one 2 x 2 block of patches.
    assert ((rows.max(1).values - rows.min(1).values) == 1).all()
    assert ((cols.max(1).values - cols.min(1).values) == 1).all()
    assert len(set(groups.flatten().tolist())) == 64
    images = images_of("internvl", 2)  # 64 x 150 (2 crops + thumbnail), 60 x 60 (1 tile)
    inputs = encode(proc, [user_turn("what ?", images=2)], images)
    assert adapter._tiles(inputs) == [3, 1]
    inputs["image_sizes"] = torch.tensor([[64, 150], [60, 60]])
    wide, square = adapter.contexts(inputs)
    assert square.grid == (4, 4) and wide.grid is None
    left, right, thumb = wide.positions.reshape(3, 16, 2)
    assert left[:, 1].max() < 0.5 < right[:, 1].min()  # crops side by side
    assert thumb[:, 1].min() < 0.25 and thumb[:, 1].max() > 0.75  # thumbnail spans the image
