"""Shared tiny-model fixtures: real transformers LVLM classes, random init from config, offline.

Sizes follow docs/contracts.md (text hidden 64, 2 layers; vision hidden 32, 2 layers) so a
forward takes milliseconds on a busy 2-core machine. Every builder seeds torch so two calls give
the same weights. Models are in eval mode with the vision towers' and LLM's default attention.

Each family's test model is its descriptor's `test` spec (`mc_core/models/families/<family>.py`).
`TINY` maps every registered family to a builder returning `(model, processor)`; the session
fixture `tiny` caches them (`tiny("llava")`), `each_family` parametrizes a test over all of
them. Tests that mutate a model should build their own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mc_core.models import families, zoo

_WORDS = (
    "what colour shape is at row col the of a an in how many there yes no "
    "red green blue yellow circle square triangle 0 1 2 3 4 5 6 7 8 9 ? , ."
)
VOCAB = _WORDS.split()

# Every registered family; a new descriptor (with its `test` spec) is covered automatically.
FAMILIES = families.available()

# Qwen images: 28-pixel units; 16 merged tokens at most per image (4 x 4 of 2 x 2 patches).
QWEN_PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 16)


def build_family(family: str):
    """The family's test-size model (its descriptor's `test` spec), seed 0, eval mode."""
    spec = families.get(family).test
    if spec is None:
        raise ValueError(f"family {family!r} declares no test spec")
    model, processor = zoo.build(spec, vocab=VOCAB, seed=0)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model, processor


def build_llava():
    """LLaVA-1.5 style: CLIP 64x64 / patch 8 -> 64 visual tokens per image."""
    return build_family("llava")


TINY = {name: (lambda name=name: build_family(name)) for name in FAMILIES}


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image (different seeds give different images)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def user_turn(question: str, images: int = 0) -> dict:
    """A user message with `images` image items before the question."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


def assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


@pytest.fixture(scope="session")
def tiny():
    """Cached `(model, processor)` per family name; do not mutate the model."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = TINY[family]()
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def each_family(request) -> str:
    """Parametrizes a test over every registered family (`families.available()`)."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine two threads per process oversubscribe
    the cores (measured 90x slower for a tiny conversation); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_snapshot(tmp_path_factory):
    """`hf_snapshot(family) -> Path`: a local Hugging Face snapshot of the family (real model and
    processor classes, trained byte-level BPE tokenizer, released-style chat template; see
    tests/hf_snapshots.py), built once per session. Load it with `hf_snapshots.load_snapshot`."""
    from hf_snapshots import build_snapshot

    root = tmp_path_factory.mktemp("hf_snapshots")
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_snapshot(family, root)
        return cache[family]

    return get
