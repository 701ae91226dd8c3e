"""HoloV against its reference code on fixed inputs, plus the method's own properties.

The fixture (tests/fixtures/baselines/holov.json) holds the inputs and the kept indices of the
reference function (obananas/HoloV, llava/model/utils.py::HoloV), run unmodified in float64
outside this repository. Where the reference zero-pads (a crop's budget above its size), ours
must keep every token the reference kept and fill the budget from other crops.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from baselines import check_selection, kept, random_inputs, rate_for

from mc_core.compressors import TokenContext, build, get_class
from mc_core.compressors.ops import kept_tokens, validate

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "holov.json"
DATA = json.loads(FIXTURE.read_text())
RUNS = [(case, run) for case in DATA["cases"] for run in case["runs"]]
DIM = 16


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(case["x"], dtype=torch.float64)
    attn = torch.tensor(case["cls_attention"], dtype=torch.float64)
    assert x.shape == (case["n"], DIM) and attn.shape == (case["n"],)
    return x, attn


@pytest.mark.parametrize(("case", "run"), RUNS, ids=[f"{c['name']}-m{r['m']}" for c, r in RUNS])
def test_matches_reference(case, run):
    x, attn = inputs(case)
    n, m = case["n"], run["m"]
    comp = build("holov", rate=rate_for(n, m), dim=DIM, **DATA["config"])
    _, P = comp(x, TokenContext(cls_attention=attn))
    ours = kept(P)
    assert len(ours) == m and ours == sorted(set(ours))
    if run["ref_padded"] == 0:
        assert ours == run["kept"]
    else:
        # The reference kept m - ref_padded real tokens and zero-padded; we keep them all and
        # hand the surplus to the crops with room.
        assert len(run["kept"]) == m - run["ref_padded"]
        assert set(run["kept"]) < set(ours)


def test_fixture_covers_exact_and_padded_runs_and_odd_budgets():
    exact = [r for _, r in RUNS if r["ref_padded"] == 0]
    padded = [r for _, r in RUNS if r["ref_padded"] > 0]
    assert len(exact) >= 20 and len(padded) >= 10
    for case in DATA["cases"]:
        budgets = {r["m"] for r in case["runs"]}
        assert {1, 5, 7, 12, case["n"] - 1} <= budgets
    # n = 24 < 2 crops: single-token crops (the reference's raw-attention score) are covered.
    assert min(c["n"] for c in DATA["cases"]) < 2 * DATA["config"]["crops"]


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.9])
def test_rows_are_one_hot_and_y_is_p_x(rate):
    n = 100
    x, attn = random_inputs(n)
    y, P = build("holov", rate=rate, dim=DIM)(x, TokenContext(cls_attention=attn))
    check_selection(x, y, P, kept_tokens(n, rate))


def test_needs_no_layout():
    # Crops are runs of the token sequence: a grid or positions change nothing.
    n = 144
    x, attn = random_inputs(n, seed=1)
    comp = build("holov", rate=0.8, dim=DIM)
    bare = comp(x, TokenContext(cls_attention=attn))[1]
    with_grid = comp(x, TokenContext(cls_attention=attn, grid=(12, 12)))[1]
    with_pos = comp(x, TokenContext(cls_attention=attn, positions=torch.rand(n, 2)))[1]
    assert torch.equal(bare, with_grid) and torch.equal(bare, with_pos)
    assert get_class("holov").needs == frozenset({"cls_attention"})


def test_each_crop_keeps_its_top_attention_tokens():
    n, crops = 103, 16  # uneven: the first 103 % 16 = 7 crops have one token more
    x, attn = random_inputs(n, seed=2)
    P = build("holov", rate=0.7, dim=DIM, crops=crops)(x, TokenContext(cls_attention=attn))[1]
    chosen = set(kept(P))
    base, extra = divmod(n, crops)
    start = 0
    for c in range(crops):
        size = base + (c < extra)
        run = list(range(start, start + size))
        k = sum(i in chosen for i in run)
        top = attn[start : start + size].topk(k).indices + start
        assert set(top.tolist()) == {i for i in run if i in chosen}, c
        start += size
    assert start == n


def test_overflow_goes_to_the_other_crops():
    # A [CLS] sink in crop 0 (tokens 0-3 of 64, 16 crops): its budget far exceeds its 4 tokens.
    # The reference keeps those 4 and zero-pads 12 rows; we keep them and fill from the others.
    n = 64
    x, _ = random_inputs(n, seed=3)
    attn = torch.full((n,), 1e-4)
    attn[:4] = torch.tensor([0.5, 0.2, 0.1, 0.1])
    attn[20] = 0.05  # crop 5 (tokens 20-23) is next: the surplus goes there first
    P = build("holov", rate=0.75, dim=DIM)(x, TokenContext(cls_attention=attn))[1]
    chosen = kept(P)
    assert len(chosen) == 16 and len(set(chosen)) == 16
    assert set(range(4)) < set(chosen) and set(range(20, 24)) < set(chosen)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_small_images(n):
    # n < crops: empty crops are dropped, single-token crops still get budget.
    x, attn = random_inputs(n, seed=n)
    for rate in (0.1, 0.5, 0.9):
        y, P = build("holov", rate=rate, dim=DIM)(x, TokenContext(cls_attention=attn))
        validate(P, n, kept_tokens(n, rate), atol=0)


def test_zero_attention_still_fills_the_budget():
    x, _ = random_inputs(50, seed=4)
    P = build("holov", rate=0.5, dim=DIM)(x, TokenContext(cls_attention=torch.zeros(50)))[1]
    validate(P, 50, 25, atol=0)
    assert len(set(kept(P))) == 25


def test_config_defaults_and_round_trip():
    comp = build("holov", rate=0.9, dim=DIM)
    assert comp.config() == {"crops": 16, "alpha": 0.09}  # the reference's LLaVA-1.5 values
    other = build("holov", rate=0.9, dim=DIM, crops=9, alpha=0.5)
    again = build("holov", rate=0.9, dim=DIM, **other.config())
    assert again.config() == {"crops": 9, "alpha": 0.5}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("crops", 0),
        ("crops", -4),
        ("crops", 2.5),
        ("crops", True),
        ("crops", "16"),
        ("alpha", -0.1),
        ("alpha", float("nan")),
        ("alpha", float("inf")),
        ("alpha", True),
        ("alpha", "0.09"),
    ],
)
def test_bad_config_names_the_value(key, value):
    with pytest.raises(ValueError, match=rf"holov {key} .*got {value!r}"):
        build("holov", rate=0.5, dim=DIM, **{key: value})


def test_missing_attention_is_named():
    x, _ = random_inputs(20)
    with pytest.raises(ValueError, match=r"holov needs TokenContext\.cls_attention"):
        build("holov", rate=0.5, dim=DIM)(x, TokenContext(grid=(4, 5)))
