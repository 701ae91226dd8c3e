"""Every registered compressor against the P contract, plus each method's own property."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mc_core.compressors import TokenContext, available, build, get_class
from mc_core.compressors.ops import kept_tokens, pool_matrix, validate

DIM = 16
METHODS = available()
# Square-ish layouts get a grid (2-D code paths); the others are plain sequences.
GRIDS = {576: (24, 24), 1000: (25, 40)}


def synthetic_context(
    n: int, seed: int = 0, *, grid: tuple[int, int] | None = None, d: int = DIM
) -> TokenContext:
    """Every field an adapter could fill, random but well-formed (prompt embeddings of width d)."""
    g = torch.Generator().manual_seed(seed)
    if grid is not None:
        h, w = grid
        rr, cc = torch.meshgrid(
            torch.arange(h) / max(h - 1, 1), torch.arange(w) / max(w - 1, 1), indexing="ij"
        )
        positions = torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)
    else:
        positions = torch.rand(n, 2, generator=g)
    return TokenContext(
        positions=positions,
        grid=grid,
        cls_attention=torch.softmax(3 * torch.randn(n, generator=g), 0),
        keys=torch.randn(n, 8, generator=g),
        prompt_attention=torch.rand(n, generator=g),
        prompt_embeddings=torch.randn(5, d, generator=g),
    )


def lvlm_like_tokens(h: int, w: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens with what matters for the generator's init: a large shared component (LVLM
    projector outputs have big norms), a spatially smooth field, and per-token noise."""
    g = torch.Generator().manual_seed(seed)
    mean = 30.0 * torch.randn(d, generator=g)
    field = torch.randn(1, d, h // 4 + 1, w // 4 + 1, generator=g)
    smooth = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    return mean + 2.0 * smooth[0].reshape(d, -1).T + torch.randn(h * w, d, generator=g)


def test_registry_lists_the_contract_methods():
    # none first, the learned method last (the order reports and error messages list them in).
    assert METHODS == [
        "none",
        "cdpruner",
        "divprune",
        "fastv",
        "holov",
        "pool",
        "prumerge",
        "prunesid",
        "random",
        "sample",
        "tome",
        "visionzip",
        "vispruner",
        "metacompress",
    ]
    for name in METHODS:
        cls = get_class(name)
        assert cls.name == name and cls.__doc__ and "\n" not in cls.__doc__.strip()
        assert cls.needs <= {"cls_attention", "keys", "prompt_attention", "prompt_embeddings"}
        assert cls.prompt_dependent == (name in {"fastv", "cdpruner"})
        assert cls.trainable == (name == "metacompress")


def test_build_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown compressor 'nope'.*metacompress"):
        build("nope", rate=0.5, dim=DIM)
    with pytest.raises(ValueError, match="bad config for compressor 'pool'"):
        build("pool", rate=0.5, dim=DIM, window=3)
    with pytest.raises(ValueError, match="dim"):
        build("pool", rate=0.5, dim=0)


@pytest.mark.parametrize("name", METHODS)
def test_bad_rate_raises_naming_it(name):
    for rate in (0.0, 1.0, 1.2, -0.5, float("nan"), "0.9"):
        if name == "none" and rate == 0.0:
            build(name, rate=rate, dim=DIM)  # `none` ignores its rate; 0 means "no reduction"
            continue
        with pytest.raises(ValueError, match=f"{name} rate"):
            build(name, rate=rate, dim=DIM)


@pytest.mark.parametrize("rate", [0.5, 0.9])
@pytest.mark.parametrize("n", [37, 576, 577, 1000])
@pytest.mark.parametrize("name", METHODS)
def test_p_contract(name, n, rate):
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(n))
    comp = build(name, rate=rate, dim=DIM)
    with torch.no_grad():
        y, P = comp(x, synthetic_context(n, grid=GRIDS.get(n)))
    m = n if name == "none" else kept_tokens(n, rate)
    assert m == math.ceil((1 - rate) * n - 1e-9) or name == "none"
    # Softmax and weighted rows: float32 row sums are within 1e-5 of 1 for n <= 1000.
    validate(P, n, m, atol=1e-5)
    assert P.dtype == torch.float32 and y.shape == (m, DIM) and y.dtype == x.dtype
    # Y is P @ X; gathers are exact, matmuls differ by float32 summation order (~1e-6 here).
    torch.testing.assert_close(y, P @ x, atol=1e-5, rtol=1e-5)
    if name in {"random", "sample", "divprune", "fastv"}:
        assert torch.equal(P.max(dim=1).values, torch.ones(m)), "pruning rows are one-hot"
        assert bool((P.sum(0) <= 1).all()), "a token is kept at most once"


@pytest.mark.parametrize("name", METHODS)
def test_list_form_matches_single_calls(name):
    sizes = [37, 64, 100]
    xs = [torch.randn(n, DIM, generator=torch.Generator().manual_seed(n)) for n in sizes]
    ctxs = [synthetic_context(n, seed=n, grid=(8, 8) if n == 64 else None) for n in sizes]
    comp = build(name, rate=0.75, dim=DIM)
    with torch.no_grad():
        ys, Ps = comp(xs, ctxs)
        if name == "random":
            comp.reseed()
        singles = [comp(x, c) for x, c in zip(xs, ctxs, strict=True)]
    assert len(ys) == len(Ps) == 3
    for (y1, p1), y, P, n in zip(singles, ys, Ps, sizes, strict=True):
        assert P.shape == (n if name == "none" else kept_tokens(n, 0.75), n)
        torch.testing.assert_close(P, p1)
        torch.testing.assert_close(y, y1)
    with pytest.raises(ValueError, match="contexts"):
        comp(xs, ctxs[:2])


@pytest.mark.parametrize("name", METHODS)
def test_any_dtype_y_follows_tokens_p_stays_float32(name):
    n = 50
    x = torch.randn(n, DIM).to(torch.bfloat16)
    y, P = build(name, rate=0.8, dim=DIM)(x, synthetic_context(n))
    assert y.dtype == torch.bfloat16 and P.dtype == torch.float32
    validate(P, n, None, atol=1e-5)
    # bf16 has 8 mantissa bits: compare to the float32 product at bf16 resolution.
    torch.testing.assert_close(y.float(), P @ x.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("name", METHODS)
def test_runs_on_cuda(name):
    n = 64
    ctx = synthetic_context(n)
    ctx = TokenContext(
        **{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(ctx).items()}
    )
    comp = build(name, rate=0.5, dim=DIM).cuda()
    y, P = comp(torch.randn(n, DIM, device="cuda"), ctx)
    assert y.is_cuda and P.is_cuda
    validate(P, n, None, atol=1e-5)


@pytest.mark.parametrize("name", [m for m in METHODS if get_class(m).needs])
def test_missing_context_names_method_and_field(name):
    field = sorted(get_class(name).needs)[0]
    ctx = synthetic_context(40)
    setattr(ctx, field, None)
    with pytest.raises(ValueError, match=rf"{name} needs TokenContext\.{field}"):
        build(name, rate=0.5, dim=DIM)(torch.randn(40, DIM), ctx)
    with pytest.raises(ValueError, match=rf"{name} needs"):
        build(name, rate=0.5, dim=DIM)(torch.randn(40, DIM))


def test_bad_inputs_raise():
    comp = build("pool", rate=0.5, dim=DIM)
    with pytest.raises(ValueError, match="dim 8"):
        comp(torch.randn(10, 8))
    with pytest.raises(ValueError, match="cls_attention"):
        comp(torch.randn(10, DIM), TokenContext(cls_attention=torch.rand(9)))
    with pytest.raises(ValueError, match="grid"):
        comp(torch.randn(10, DIM), TokenContext(grid=(3, 3)))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        comp(torch.randn(10))


def test_none_is_identity():
    x = torch.randn(30, DIM)
    y, P = build("none", rate=0.9, dim=DIM)(x)
    assert torch.equal(y, x) and torch.equal(P, torch.eye(30))


def test_random_is_seeded_and_sorted():
    x = torch.randn(200, DIM)
    a, b, c = (build("random", rate=0.9, dim=DIM, seed=s) for s in (3, 3, 4))
    pa, pb, pc = a(x)[1], b(x)[1], c(x)[1]
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    idx = pa.argmax(1)
    assert bool((idx[1:] > idx[:-1]).all())
    assert not torch.equal(a(x)[1], pa), "successive draws differ"
    a.reseed()
    assert torch.equal(a(x)[1], pa), "reseed restarts the sequence"


def test_sample_is_equidistant():
    P = build("sample", rate=0.9, dim=DIM)(torch.randn(576, DIM))[1]
    expect = torch.linspace(0, 575, 58, dtype=torch.float64).round().long()
    assert torch.equal(P.argmax(1), expect) and expect[0] == 0 and expect[-1] == 575


def test_pool_uses_grid_when_given():
    x = torch.randn(576, DIM)
    P_grid = build("pool", rate=0.75, dim=DIM)(x, TokenContext(grid=(24, 24)))[1]
    # 576 -> 144 on a 24 x 24 grid is 2 x 2 blocks: row 0 averages tokens 0, 1, 24, 25.
    assert torch.equal(P_grid[0].nonzero().squeeze(1), torch.tensor([0, 1, 24, 25]))
    P_seq = build("pool", rate=0.75, dim=DIM)(x)[1]
    assert torch.equal(P_seq[0].nonzero().squeeze(1), torch.tensor([0, 1, 2, 3]))


def test_fastv_keeps_top_prompt_attention_in_order():
    n = 100
    score = torch.rand(n, generator=torch.Generator().manual_seed(1))
    comp = build("fastv", rate=0.9, dim=DIM)
    P = comp(torch.randn(n, DIM), TokenContext(prompt_attention=score))[1]
    assert torch.equal(P.argmax(1), score.topk(10).indices.sort().values)


def test_prumerge_keeps_top_attention_and_merges_every_pruned_token_once():
    n = 120
    ctx = synthetic_context(n, seed=5)
    x = torch.randn(n, DIM)
    P = build("prumerge", rate=0.9, dim=DIM)(x, ctx)[1]
    m = P.shape[0]
    keep = ctx.cls_attention.topk(m).indices.sort().values
    # Row i is anchored on the i-th kept token (largest attention in its own group).
    assert bool((P[torch.arange(m), keep] > 0).all())
    assert torch.equal((P > 0).sum(0), torch.ones(n, dtype=torch.long)), "each token used once"
    keys = F.normalize(ctx.keys, dim=-1)
    pruned = [j for j in range(n) if j not in set(keep.tolist())]
    owner = (keys[pruned] @ keys[keep].T).argmax(1)
    assert torch.equal(P[:, pruned].argmax(0), owner), "merged into the most key-similar kept token"
    # Weights inside a row are proportional to [CLS] attention.
    row = P[0]
    cols = row.nonzero().squeeze(1)
    torch.testing.assert_close(
        row[cols], ctx.cls_attention[cols] / ctx.cls_attention[cols].sum(), atol=1e-6, rtol=1e-4
    )  # float32 normalisation, attention + 1e-8


def test_visionzip_dominant_and_contextual_split():
    n = 640
    ctx = synthetic_context(n, seed=2)
    P = build("visionzip", rate=0.9, dim=DIM)(torch.randn(n, DIM), ctx)[1]
    m = P.shape[0]  # 64: the paper's 54 dominant + 10 contextual
    one_hot = P.max(1).values == 1
    assert m == 64 and int(one_hot.sum()) == 54
    dominant = P[one_hot].argmax(1)
    assert set(dominant.tolist()) == set(ctx.cls_attention.topk(54).indices.tolist())
    assert bool(((P > 0).sum(0) <= 1).all()), "each token in at most one output"
    assert int((P > 0).sum()) == n, "contextual tokens absorb every remaining token"
    ctx_rows = P[~one_hot]
    for row in ctx_rows:  # contextual groups are plain averages
        vals = row[row > 0]
        torch.testing.assert_close(vals, torch.full_like(vals, 1 / vals.numel()))


def test_divprune_covers_separated_clusters():
    # 8 tight clusters of 25 tokens: 8 diverse picks must hit every cluster once.
    g = torch.Generator().manual_seed(0)
    centres = torch.linalg.qr(torch.randn(DIM, 8, generator=g))[0].T  # orthonormal directions
    x = centres.repeat_interleave(25, 0) + 0.01 * torch.randn(200, DIM, generator=g)
    P = build("divprune", rate=0.96, dim=DIM)(x)[1]
    assert P.shape[0] == 8
    assert sorted((P.argmax(1) // 25).tolist()) == list(range(8))


def test_tome_merges_duplicates_size_weighted():
    # Pairs of identical tokens at (2i, 2i+1): the bipartite split puts one in A, one in B, so
    # halving must merge exactly the duplicates, each row averaging its pair.
    base = torch.randn(16, DIM, generator=torch.Generator().manual_seed(0))
    x = base.repeat_interleave(2, 0)
    y, P = build("tome", rate=0.5, dim=DIM)(x)
    assert P.shape == (16, 32)
    expect = torch.zeros(16, 32)
    expect[torch.arange(16).repeat_interleave(2), torch.arange(32)] = 0.5
    torch.testing.assert_close(P, expect)
    torch.testing.assert_close(y, base)
    # Repeated rounds compose: 32 -> 3 needs several rounds and still gives convex rows whose
    # weights are multiples of 1/size (size-weighted averages of original tokens).
    P3 = build("tome", rate=0.9, dim=DIM)(x)[1]
    validate(P3, 32, 4, atol=1e-6)
    sizes = (P3 > 0).sum(1, keepdim=True).float()
    torch.testing.assert_close(P3[P3 > 0], (1 / sizes).expand_as(P3)[P3 > 0])


# --- metacompress ---------------------------------------------------------------------------


def test_metacompress_parameters_and_init():
    comp = build("metacompress", rate=0.9, dim=DIM, d_c=8)
    assert {n for n, _ in comp.named_parameters()} == {"w_q", "w_k", "beta"}
    assert torch.equal(comp.w_q, comp.w_k), "W_q = W_k at init"
    assert comp.w_q.shape == (DIM, 8) and comp.beta.shape == (8,)
    cfg = comp.generator_config()
    assert cfg["d"] == DIM and cfg["d_c"] == 8 and "pos" in cfg
    assert build("metacompress", rate=0.9, dim=DIM).d_c == 64  # default d_c (docs/method.md)


def test_metacompress_gradients_reach_only_its_parameters():
    n = 100
    comp = build("metacompress", rate=0.9, dim=DIM)
    x = torch.randn(n, DIM)  # frozen LVLM output: no grad
    target = torch.randn(kept_tokens(n, 0.9), DIM)
    ys, Ps = comp([x, x[:64]], [synthetic_context(n), TokenContext(grid=(8, 8))])
    loss = sum((y - target[: y.shape[0]]).pow(2).sum() for y in ys)
    loss.backward()
    for name, p in comp.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name
    assert x.grad is None
    # Features precomputed under inference_mode (a cache of the frozen LVLM) still train.
    with torch.inference_mode():
        cached = torch.randn(n, DIM)
    comp.zero_grad()
    comp(cached)[0].sum().backward()
    assert float(comp.beta.grad.abs().sum()) > 0


def test_metacompress_is_invariant_to_token_scale_and_offset():
    # Centring + RMS normalisation: an LVLM whose tokens are 1000x larger and shifted gets the
    # same P, so beta_init does not depend on the model's token norms.
    x = torch.randn(200, DIM)
    comp = build("metacompress", rate=0.9, dim=DIM)
    with torch.no_grad():
        P1 = comp(x)[1]
        P2 = comp(1000 * x + 50 * torch.randn(DIM))[1]
    torch.testing.assert_close(P1, P2, atol=1e-4, rtol=1e-3)  # float32 at 1e3-scale inputs


@pytest.mark.parametrize("grid", [(24, 24), None])
@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_metacompress_init_is_close_to_pooling(grid, rate):
    """Quantified: at init, >= 75% of each row's mass lies in its pooling window, and the mean
    total-variation distance to the pooling P is <= 0.6 (uniform P: ~2% / ~0.98).

    Measured at d = 256 on LVLM-like tokens (seeds 0, 1): in-window 0.87-0.96, TV 0.28-0.51;
    at d = 4096 the same within 0.02. The gap to TV 0 is the "weighted" part: inside its
    window a row favours tokens similar to the window mean.
    """
    d, n = 256, 576
    for seed in (0, 1):
        x = lvlm_like_tokens(24, 24, d, seed=seed)
        comp = build("metacompress", rate=rate, dim=d, seed=seed)
        with torch.no_grad():
            P = comp(x, TokenContext(grid=grid) if grid else None)[1]
        pool = pool_matrix(n, comp.kept(n), grid)
        in_window = float((P * (pool > 0)).sum(1).mean())
        tv = float(0.5 * (P - pool).abs().sum(1).mean())
        uniform_in_window = float((pool > 0).float().sum(1).mean()) / n
        assert in_window >= 0.75, (seed, in_window)
        assert tv <= 0.6, (seed, tv)
        assert uniform_in_window < 0.05


def test_metacompress_pos_width_widens_the_prior_and_round_trips(tmp_path):
    """pos_width scales the positional kernel's window: wider lets rows leave their window.

    A prior 4 windows wide must put less of each row's mass in its own window at init than
    the default one-window prior (same weights and tokens; only the E_pos table differs).
    """
    from mc_core.compressors.checkpoint import load_compressor, save_compressor

    d, n = 256, 576
    x = lvlm_like_tokens(24, 24, d, seed=0)
    ctx = TokenContext(grid=(24, 24))
    in_window = {}
    for width in (1.0, 4.0):
        comp = build("metacompress", rate=0.5, dim=d, seed=0, pos_width=width)
        with torch.no_grad():
            P = comp(x, ctx)[1]
        pool = pool_matrix(n, comp.kept(n), (24, 24))
        in_window[width] = float((P * (pool > 0)).sum(1).mean())
    assert in_window[4.0] < in_window[1.0] - 0.1, in_window
    # Default: not recorded, so checkpoints saved before the knob keep config and fingerprint.
    default = build("metacompress", rate=0.5, dim=d)
    assert "pos_width" not in default.config()
    assert "pos_width" not in default.generator_config()
    wide = build("metacompress", rate=0.5, dim=d, pos_width=2.0)
    assert wide.generator_config()["pos_width"] == 2.0
    save_compressor(tmp_path / "c", wide, meta={})
    back = load_compressor(tmp_path / "c")
    assert back.pos_width == 2.0
    with torch.no_grad():
        torch.testing.assert_close(back(x, ctx)[1], wide(x, ctx)[1])
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="pos_width"):
            build("metacompress", rate=0.5, dim=d, pos_width=bad)


def test_register_decorator_adds_a_method_and_refuses_a_duplicate():
    import mc_core.compressors as C
    from mc_core.compressors.base import Compressor

    @C.register("test-keep-first")
    class KeepFirst(Compressor):
        def _compress(self, x, ctx):
            return self._select(x, torch.arange(self.kept(x.shape[0])))

    try:
        assert KeepFirst.name == "test-keep-first" and "test-keep-first" in C.available()
        y, p = C.build("test-keep-first", rate=0.5, dim=DIM)(torch.randn(10, DIM))
        assert y.shape == (5, DIM) and p.shape == (5, 10)
        with pytest.raises(ValueError, match="registered twice"):
            C.register("test-keep-first")(type("Other", (Compressor,), {}))
        with pytest.raises(TypeError, match="Compressor subclass"):
            C.register("x")(int)
    finally:
        C._REGISTRY.pop("test-keep-first")
    # Every method file registered itself (no central list to forget).
    files = {p.stem for p in Path(C.__file__).parent.glob("*.py")} - {"__init__"} - C._SHARED
    assert {get_class(n).__module__.rsplit(".", 1)[1] for n in C.available()} == files
