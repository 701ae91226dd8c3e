"""Shared by the faithfulness tests of the 2025-26 baselines (tests/test_<method>.py): their
reference fixtures, the rate that gives a budget exactly, and the selection contract."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mc_core.compressors.ops import kept_tokens, validate

FIXTURES = Path(__file__).parent / "fixtures" / "baselines"


def load_fixture(method: str) -> dict:
    """tests/fixtures/baselines/<method>.json: inputs and the reference code's kept sets."""
    return json.loads((FIXTURES / f"{method}.json").read_text())


def rate_for(n: int, m: int) -> float:
    """A rate whose budget ceil((1 - rate) n) is exactly m (asserted); half a token below m
    keeps float rounding from tipping the ceiling either way."""
    rate = 1 - (m - 0.5) / n
    assert kept_tokens(n, rate) == m, (n, m, rate)
    return rate


def kept(P: torch.Tensor) -> list[int]:
    """The token each one-hot row of P keeps."""
    return P.argmax(dim=1).tolist()


def random_inputs(n: int, seed: int = 0, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [n, d] and a [CLS]-attention distribution over them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.softmax(torch.randn(n, generator=g), 0)


def check_selection(x: torch.Tensor, y: torch.Tensor, P: torch.Tensor, m: int) -> None:
    """A pruning P: m one-hot rows, each token kept at most once, in image order, Y = P X."""
    validate(P, x.shape[0], m, atol=0)
    assert torch.equal(P.max(dim=1).values, torch.ones(m)), "one-hot rows"
    assert bool((P.sum(0) <= 1).all()), "a token is kept at most once"
    idx = P.argmax(1)
    assert bool((idx[1:] > idx[:-1]).all()), "kept tokens in their original order"
    assert torch.equal(y, x[idx])
    torch.testing.assert_close(y, P @ x)
