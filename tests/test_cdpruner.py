"""CDPruner against its reference code's selections, plus its own properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from baselines import kept, rate_for

from mc_core.compressors import TokenContext, build, get_class
from mc_core.compressors.ops import kept_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "cdpruner.json"
DOC = json.loads(FIXTURE.read_text())
CASES = DOC["cases"]


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    inp = DOC["inputs"][name]
    return (
        torch.tensor(inp["tokens"], dtype=torch.float64),
        torch.tensor(inp["prompt_embeddings"], dtype=torch.float64),
    )


def _case_id(c: dict) -> str:
    return f"{c['input']}-m{c['m']}-neg{int(c['negate_relevance'])}-theta{c['theta']}"


def test_fixture_is_small_and_covers_the_cases():
    assert FIXTURE.stat().st_size < 200_000
    for name in DOC["inputs"]:
        n = _inputs(name)[0].shape[0]
        ms = {c["m"] for c in CASES if c["input"] == name}
        assert {1, 5, 7, 12} <= ms and (n - 1 in ms or name.startswith("llava")), name
    assert {(c["negate_relevance"], c["theta"]) for c in CASES} >= {
        (False, None),
        (True, None),
        (False, 0.5),
        (True, 0.8),
    }
    # Every reference step had a gain well above the stop threshold, so ours must agree exactly.
    assert min(c["min_relative_gain"] for c in CASES) > 1e-6


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference_selection(case):
    x, prompt = _inputs(case["input"])
    n, d = x.shape
    comp = build(
        "cdpruner",
        rate=rate_for(n, case["m"]),
        dim=d,
        theta=case["theta"],
        negate_relevance=case["negate_relevance"],
    )
    for dtype in (torch.float64, torch.float32):
        y, P = comp(x.to(dtype), TokenContext(prompt_embeddings=prompt.to(dtype)))
        assert kept(P) == case["kept"], dtype
        assert torch.equal(y, x.to(dtype)[case["kept"]])


def test_p_is_one_hot_sorted_and_y_is_the_kept_rows():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 64
    x = torch.randn(n, d, generator=g)
    ctx = TokenContext(prompt_embeddings=torch.randn(6, d, generator=g))
    y, P = build("cdpruner", rate=0.9, dim=d)(x, ctx)
    m = kept_tokens(n, 0.9)
    assert P.shape == (m, n) and P.dtype == torch.float32
    assert torch.equal(P.sum(dim=1), torch.ones(m)) and torch.equal(P.max(1).values, torch.ones(m))
    kept = P.argmax(dim=1)
    assert bool((kept[1:] > kept[:-1]).all()), "ascending original order, no repeats"
    assert torch.equal(y, x[kept])


def test_relevance_is_the_reference_normalisation():
    g = torch.Generator().manual_seed(1)
    x, prompt = torch.randn(50, 16, generator=g), torch.randn(4, 16, generator=g)
    cos = (F.normalize(x.double(), dim=-1) @ F.normalize(prompt.double(), dim=-1).T).mean(1)
    span = cos.max() - cos.min()
    for negate, sign in ((False, 1), (True, -1)):
        rel = build("cdpruner", rate=0.5, dim=16, negate_relevance=negate).relevance(x, prompt)
        s = sign * cos
        torch.testing.assert_close(rel, (s - s.min() + 1e-6) / span)
    theta = build("cdpruner", rate=0.5, dim=16, theta=0.5)
    torch.testing.assert_close(
        theta.relevance(x, prompt), torch.exp(0.5 * ((cos - cos.min() + 1e-6) / span))
    )
    # No prompt tokens (or equal relevance everywhere): uniform, a plain similarity DPP.
    empty = build("cdpruner", rate=0.5, dim=16).relevance(x, torch.zeros(0, 16))
    assert torch.equal(empty, torch.ones(50, dtype=torch.float64))


def test_choice_follows_the_prompt():
    g = torch.Generator().manual_seed(2)
    n, d = 120, 32
    x = torch.randn(n, d, generator=g)
    comp = build("cdpruner", rate=1 - 10 / n, dim=d)
    assert get_class("cdpruner").prompt_dependent
    picks = set()
    for seed in range(4):
        prompt = torch.randn(5, d, generator=torch.Generator().manual_seed(100 + seed))
        chosen = kept(comp(x, TokenContext(prompt_embeddings=prompt))[1])
        assert chosen == kept(comp(x, TokenContext(prompt_embeddings=prompt))[1]), "deterministic"
        picks.add(tuple(chosen))
    assert len(picks) == 4, "each prompt keeps its own subset"
    # One token kept: the one most similar (mean cosine) to the prompt, the DPP's first pick.
    one = build("cdpruner", rate=1 - 1 / n, dim=d)
    prompt = x[[7, 7, 7]] + 0.1 * torch.randn(3, d, generator=g)
    assert kept(one(x, TokenContext(prompt_embeddings=prompt))[1]) == [7]


def test_budgets_nest_past_the_kernel_rank():
    # d = 8 < m: the greedy exhausts the kernel's rank and restarts on the unchosen tokens; no
    # NaN, distinct tokens, and a smaller budget's choice is a prefix of a larger one's.
    g = torch.Generator().manual_seed(3)
    n, d = 100, 8
    x = torch.randn(n, d, generator=g)
    ctx = TokenContext(prompt_embeddings=torch.randn(3, d, generator=g))
    small = set(kept(build("cdpruner", rate=0.94, dim=d)(x, ctx)[1]))  # 6
    y, P = build("cdpruner", rate=0.5, dim=d)(x, ctx)  # 50
    big = kept(P)
    assert len(set(big)) == 50 and small <= set(big) and torch.isfinite(y).all()
    # Exact duplicates: 8 picks (the rank) never take both twins; 19 of 20 still works.
    dup, ctx = torch.cat([x[:10], x[:10]]), TokenContext(prompt_embeddings=x[:2])
    kept8 = kept(build("cdpruner", rate=0.6, dim=d)(dup, ctx)[1])
    assert len({i % 10 for i in kept8}) == 8
    y19, P19 = build("cdpruner", rate=0.05, dim=d)(dup, ctx)
    assert len(set(kept(P19))) == 19 and torch.isfinite(y19).all()


@pytest.mark.parametrize(
    ("kw", "bad"),
    [
        ("theta", 0.0),
        ("theta", 1.0),
        ("theta", -0.5),
        ("theta", float("nan")),
        ("theta", True),
        ("theta", "0.5"),
        ("negate_relevance", 1),
        ("negate_relevance", "yes"),
    ],
)
def test_bad_args_raise_naming_the_value(kw, bad):
    with pytest.raises(ValueError, match=f"cdpruner {kw}") as err:
        build("cdpruner", rate=0.5, dim=16, **{kw: bad})
    assert repr(bad) in str(err.value)


def test_config_round_trips():
    assert build("cdpruner", rate=0.5, dim=16).config() == {
        "theta": None,
        "negate_relevance": False,
    }
    cfg = build("cdpruner", rate=0.5, dim=16, theta=0.5, negate_relevance=True).config()
    again = build("cdpruner", rate=0.5, dim=16, **cfg)
    assert (again.theta, again.negate_relevance) == (0.5, True)


def test_prompt_embeddings_errors_are_clear():
    comp = build("cdpruner", rate=0.5, dim=16)
    x = torch.randn(10, 16)
    with pytest.raises(ValueError, match=r"cdpruner needs TokenContext\.prompt_embeddings"):
        comp(x, TokenContext())
    with pytest.raises(ValueError, match=r"prompt_embeddings have width 8.*16"):
        comp(x, TokenContext(prompt_embeddings=torch.randn(3, 8)))
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(16,\), expected \(t, d\)"):
        comp(x, TokenContext(prompt_embeddings=torch.randn(16)))
