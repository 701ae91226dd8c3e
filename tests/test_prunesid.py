"""PruneSID against its reference code on fixed inputs, plus the method's own properties.

The fixture (tests/fixtures/baselines/prunesid.json) holds the inputs and the kept indices of the
reference selection (ZhengyaoFang/PruneSID, prunesid/prunesid_llava/clip_encoder.py,
CLIPVisionTower_PruneSID.forward), run outside this repository on a stub vision tower with the
three edits the fixture lists (no [CLS] slot, exact PCA for the randomized torch.pca_lowrank,
float64 similarity) — the same adaptations the method's docstring states.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from baselines import check_selection, kept, random_inputs, rate_for

from mc_core.compressors import TokenContext, build, get_class
from mc_core.compressors.ops import kept_tokens, validate
from mc_core.compressors.prunesid import _top_loadings

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "prunesid.json"
DATA = json.loads(FIXTURE.read_text())
RUNS = [(case, run) for case in DATA["cases"] for run in case["runs"]]
DIM = 16


@pytest.mark.parametrize(("case", "run"), RUNS, ids=[f"{c['name']}-m{r['m']}" for c, r in RUNS])
def test_matches_reference(case, run):
    x = torch.tensor(case["x"], dtype=torch.float64)
    attn = torch.tensor(case["cls_attention"], dtype=torch.float64)
    n, m = case["n"], run["m"]
    assert x.shape == (n, DIM)
    comp = build("prunesid", rate=rate_for(n, m), dim=DIM, **DATA["config"])
    _, P = comp(x, TokenContext(cls_attention=attn))
    assert kept(P) == run["kept"]


def test_fixture_covers_odd_budgets_and_several_groups():
    for case in DATA["cases"]:
        budgets = {r["m"] for r in case["runs"]}
        # n - 1 wherever its m // 4 groups stay below the rank of d = 16 features (unique PCA).
        assert {1, 5, 7, 12} <= budgets and ((case["n"] - 1) in budgets) == (case["n"] <= 64)
    # Budgets up to 63 tokens: up to 15 PCA groups, so allocation and fill order are exercised.
    assert max(r["m"] // DATA["config"]["group_size"] for _, r in RUNS) == 15


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.9])
def test_rows_are_one_hot_and_y_is_p_x(rate):
    n = 120
    x, attn = random_inputs(n)
    y, P = build("prunesid", rate=rate, dim=DIM)(x, TokenContext(cls_attention=attn))
    check_selection(x, y, P, kept_tokens(n, rate))


def test_nms_keeps_the_most_attended_token_of_each_redundant_cluster():
    # 8 orthogonal directions, 5 near-copies each. Copies are ~1 similar, other pairs ~0, so
    # the threshold (8 / 32) * mean similarity (~0.026) suppresses exactly the copies; with the
    # cap out of the way every group's budget is its survivor count: one token per cluster.
    g = torch.Generator().manual_seed(0)
    centres = torch.linalg.qr(torch.randn(DIM, 8, generator=g))[0].T  # (8, DIM) orthonormal
    x = centres.repeat_interleave(5, 0) + 1e-3 * torch.randn(40, DIM, generator=g)
    attn = torch.softmax(torch.randn(40, generator=g), 0)
    comp = build("prunesid", rate=rate_for(40, 8), dim=DIM, group_cap=8)
    P = comp(x, TokenContext(cls_attention=attn))[1]
    expect = sorted((attn.view(8, 5).argmax(1) + 5 * torch.arange(8)).tolist())
    assert kept(P) == expect


def test_top_loadings_are_the_leading_singular_vectors():
    g = torch.Generator().manual_seed(1)
    for d, n in [(40, 12), (12, 40)]:  # both Gram sides
        a = torch.randn(d, n, generator=g, dtype=torch.float64)
        a = a - a.mean(dim=0, keepdim=True)
        ref = torch.linalg.svd(a, full_matrices=False).Vh[:5].T.abs()
        torch.testing.assert_close(_top_loadings(a, 5).abs(), ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize(("n", "d"), [(1, DIM), (3, DIM), (30, 2), (200, 4)])
def test_small_images_and_narrow_tokens(n, d):
    # q is at least 1 (the reference has 0 groups for m < 4) and at most min(d - 1, n).
    x, attn = random_inputs(n, seed=n, d=d)
    for rate in (0.1, 0.5, 0.9):
        y, P = build("prunesid", rate=rate, dim=d)(x, TokenContext(cls_attention=attn))
        validate(P, n, kept_tokens(n, rate), atol=0)


def test_zero_attention_tokens_fill_only_their_own_group():
    # LLaVA-NeXT newline tokens have attention 0: never NMS survivors, and with no positive
    # attention at all the groups share the budget by size (the reference divides by zero).
    x, attn = random_inputs(60, seed=5)
    attn[::3] = 0
    for a in (attn, torch.zeros(60)):
        P = build("prunesid", rate=0.6, dim=DIM)(x, TokenContext(cls_attention=a))[1]
        validate(P, 60, 24, atol=0)
        assert len(set(kept(P))) == 24


def test_full_budget_keeps_everything():
    x, attn = random_inputs(7)
    P = build("prunesid", rate=0.01, dim=DIM)(x, TokenContext(cls_attention=attn))[1]
    assert torch.equal(P, torch.eye(7))


def test_config_defaults_and_round_trip():
    comp = build("prunesid", rate=0.9, dim=DIM)
    # The reference's constants: q = m // 4 groups, threshold (m / 32) * mean similarity,
    # a per-group cap of 5 per started 64 tokens.
    assert comp.config() == {"group_size": 4, "nms_tokens": 32.0, "group_cap": 5}
    other = build("prunesid", rate=0.9, dim=DIM, group_size=2, nms_tokens=8, group_cap=3)
    again = build("prunesid", rate=0.9, dim=DIM, **other.config())
    assert again.config() == {"group_size": 2, "nms_tokens": 8.0, "group_cap": 3}
    assert get_class("prunesid").needs == frozenset({"cls_attention"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("group_size", 0),
        ("group_size", 1.5),
        ("group_size", True),
        ("group_cap", -1),
        ("group_cap", "5"),
        ("nms_tokens", 0),
        ("nms_tokens", -32.0),
        ("nms_tokens", math.inf),
        ("nms_tokens", float("nan")),
        ("nms_tokens", False),
    ],
)
def test_bad_config_names_the_value(key, value):
    with pytest.raises(ValueError, match=rf"prunesid {key} .*got {value!r}"):
        build("prunesid", rate=0.5, dim=DIM, **{key: value})


def test_missing_attention_is_named():
    x, _ = random_inputs(20)
    with pytest.raises(ValueError, match=r"prunesid needs TokenContext\.cls_attention"):
        build("prunesid", rate=0.5, dim=DIM)(x, TokenContext(grid=(4, 5)))
