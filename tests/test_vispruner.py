"""VisPruner against its reference code's selections, plus its own properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from baselines import kept, rate_for

from mc_core.compressors import TokenContext, build, get_class
from mc_core.compressors.ops import kept_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "vispruner.json"
DOC = json.loads(FIXTURE.read_text())
CASES = DOC["cases"]


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    inp = DOC["inputs"][name]
    return (
        torch.tensor(inp["tokens"], dtype=torch.float64),
        torch.tensor(inp["cls_attention"], dtype=torch.float64),
    )


def test_fixture_is_small_and_covers_the_cases():
    assert FIXTURE.stat().st_size < 200_000
    assert {c["important_ratio"] for c in CASES} == {0.0, 0.5, 0.75, 1.0}
    for name in DOC["inputs"]:
        n = _inputs(name)[0].shape[0]
        assert {1, 5, 7, 12, n - 1} <= {c["m"] for c in CASES if c["input"] == name}, name


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c['input']}-m{c['m']}-r{c['important_ratio']}" for c in CASES]
)
def test_matches_reference_selection(case):
    x, attn = _inputs(case["input"])
    n, d = x.shape
    rate = rate_for(n, case["m"])
    comp = build("vispruner", rate=rate, dim=d, important_ratio=case["important_ratio"])
    for dtype in (torch.float64, torch.float32):
        y, P = comp(x.to(dtype), TokenContext(cls_attention=attn.to(dtype)))
        assert kept(P) == case["kept"], dtype
        assert torch.equal(y, x.to(dtype)[case["kept"]])


def test_p_is_one_hot_sorted_and_y_is_the_kept_rows():
    g = torch.Generator().manual_seed(0)
    n, d = 577, 16
    x = torch.randn(n, d, generator=g)
    attn = torch.softmax(3 * torch.randn(n, generator=g), 0)
    y, P = build("vispruner", rate=0.9, dim=d)(x, TokenContext(cls_attention=attn))
    m = kept_tokens(n, 0.9)
    assert P.shape == (m, n) and P.dtype == torch.float32
    assert torch.equal(P.max(dim=1).values, torch.ones(m))
    assert torch.equal(P.sum(dim=1), torch.ones(m)), "rows one-hot"
    kept = P.argmax(dim=1)
    assert bool((kept[1:] > kept[:-1]).all()), "ascending original order, no repeats"
    assert torch.equal(y, x[kept])


def test_important_half_is_the_top_attention():
    g = torch.Generator().manual_seed(1)
    n, d = 200, 16
    x = torch.randn(n, d, generator=g)
    attn = torch.rand(n, generator=g)
    P = build("vispruner", rate=0.8, dim=d)(x, TokenContext(cls_attention=attn))[1]
    chosen = set(kept(P))
    assert len(chosen) == 40
    assert set(attn.topk(20).indices.tolist()) <= chosen  # int(40 * 0.5) important tokens
    # important_ratio = 1: exactly the top of the attention ranking.
    P1 = build("vispruner", rate=0.8, dim=d, important_ratio=1.0)(
        x, TokenContext(cls_attention=attn)
    )[1]
    assert set(kept(P1)) == set(attn.topk(40).indices.tolist())


def test_a_round_drops_the_a_tokens_that_duplicate_b_tokens():
    # Attention order p0 > ... > p7 alternates into A = p0, p2, p4, p6 and B = p1, p3, p5, p7.
    # p2 duplicates p1 and p6 duplicates p5: keeping 6 with no important tokens, one round of
    # surplus 2 drops exactly those two.
    e = torch.eye(6, dtype=torch.float64)
    rank_vec = [e[0], e[1], e[1], e[2], e[3], e[4], e[4], e[5]]
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # token index of p_k
    x = torch.zeros(8, 6, dtype=torch.float64)
    attn = torch.zeros(8)
    for k, (i, v) in enumerate(zip(perm.tolist(), rank_vec, strict=True)):
        x[i] = v + 1e-3 * (k + 1) * e[(k + 3) % 6]
        attn[i] = 1.0 - 0.1 * k
    P = build("vispruner", rate=0.25, dim=6, important_ratio=0.0)(
        x, TokenContext(cls_attention=attn)
    )[1]
    assert kept(P) == sorted(set(range(8)) - {int(perm[2]), int(perm[6])})


def test_depends_only_on_tokens_and_attention():
    g = torch.Generator().manual_seed(3)
    n, d = 100, 16
    x = torch.randn(n, d, generator=g)
    attn = torch.rand(n, generator=g)
    comp = build("vispruner", rate=0.9, dim=d)
    assert not get_class("vispruner").prompt_dependent
    P = comp(x, TokenContext(cls_attention=attn))[1]
    other = TokenContext(
        cls_attention=attn,
        keys=torch.randn(n, 8, generator=g),
        prompt_attention=torch.rand(n, generator=g),
        prompt_embeddings=torch.randn(7, d, generator=g),
        positions=torch.rand(n, 2, generator=g),
    )
    assert torch.equal(comp(x, other)[1], P), "no other context field matters"
    assert torch.equal(comp(x, TokenContext(cls_attention=attn))[1], P), "deterministic"
    assert not torch.equal(comp(x, TokenContext(cls_attention=attn.flip(0)))[1], P)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_important_ratio_raises_naming_it(bad):
    with pytest.raises(ValueError, match="vispruner important_ratio") as err:
        build("vispruner", rate=0.5, dim=16, important_ratio=bad)
    assert repr(bad) in str(err.value)


def test_config_round_trips_with_the_reference_default():
    assert build("vispruner", rate=0.5, dim=16).config() == {"important_ratio": 0.5}
    cfg = build("vispruner", rate=0.5, dim=16, important_ratio=0.75).config()
    assert build("vispruner", rate=0.5, dim=16, **cfg).important_ratio == 0.75


def test_missing_cls_attention_names_the_field():
    with pytest.raises(ValueError, match=r"vispruner needs TokenContext\.cls_attention"):
        build("vispruner", rate=0.5, dim=16)(torch.randn(10, 16), TokenContext())
