"""The inference benchmark runs end to end on tiny shapes and writes valid results.

No timing assertions: timings on a shared CPU are noise. The properties checked are the ones the
harness computes exactly (token counts, ideal ratios, fields, files).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bench import inference, report, shapes
from bench.__main__ import main

METHODS = ["none", "sample", "metacompress", "fastv"]
RATES = [0.5, 0.9]


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    return inference.run(
        "llava-1.5-7b",
        "tiny",
        device="cpu",
        rates=RATES,
        methods=METHODS,
        repeats=2,
        warmup=0,
        new_tokens=2,
        turns=3,
        threads=1,
    )


def test_every_case_present_with_required_fields(result):
    cases = result["cases"]
    assert [(c["method"], c["rate"]) for c in cases] == [("none", 0.0)] + [
        (m, r) for r in RATES for m in METHODS[1:]
    ]
    for c in cases:
        for k in report.REQUIRED_CASE_FIELDS:
            assert k in c, k
        assert c["samples"] == 2
        assert c["arch"] == "llava-1.5-7b"
        # Every interval is a real duration; e2e covers ttft plus the decoding.
        for k in ("vision_ms", "prefill_ms", "ttft_ms", "e2e_ms"):
            assert c[k] > 0, (c["method"], k)
        assert c["e2e_ms"] >= c["ttft_ms"]


def test_token_counts_and_ideal_ratios_are_exact(result):
    prompt = shapes.PromptShape()
    text = prompt.before_image + prompt.after_image
    base = result["cases"][0]
    assert base["visual_tokens"] == 576  # CLIP-L/14 at 336 px: 24 x 24 patches
    assert base["seq_len"] == text + 576
    assert base["speedup_ideal"] == 1.0
    for c in result["cases"][1:]:
        m = math.ceil((1 - c["rate"]) * 576)  # contract: m = ceil((1 - rate) n)
        assert c["visual_tokens"] == m, c
        assert c["seq_len"] == text + m
        assert c["speedup_ideal"] == pytest.approx((text + 576) / (text + m), rel=1e-3)
        # Quadratic attention makes the FLOPs ratio exceed the linear token ratio.
        assert c["speedup_ideal_flops"] > c["speedup_ideal"]


def test_overhead_vs_sample_defined_per_rate(result):
    for c in result["cases"]:
        if c["method"] == "none":
            assert c["overhead_vs_sample"] is None
        else:
            assert isinstance(c["overhead_vs_sample"], float)
        if c["method"] == "sample":  # compared with itself: exactly zero both ways
            assert c["overhead_vs_sample"] == pytest.approx(0.0, abs=1e-9)
            assert c["overhead_vs_sample_calls"] == pytest.approx(0.0, abs=1e-9)
    t = result["targets"]
    assert t["rate"] == 0.9
    assert set(t["measured_over_ideal"]) == set(METHODS[1:])
    assert {
        "metacompress_vs_sample",
        "metacompress_vs_sample_calls",
        "metacompress_overhead_pct",
    } <= set(t)


def test_write_all_outputs(result, tmp_path):
    paths = report.write_all(result, tmp_path, "testbox")
    assert {p.name for p in tmp_path.iterdir()} == {
        "testbox-llava-1.5-7b-tiny.json",
        "testbox-llava-1.5-7b-tiny.md",
        "testbox-llava-1.5-7b-tiny.png",
    }
    umask = os.umask(0)
    os.umask(umask)
    for p in paths.values():  # plain shared files, not mkstemp's private 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN would not parse back as such
    assert data["machine"]["torch"] == torch.__version__
    assert data["machine"]["cpu_count"] >= 1
    assert data["scale"] == "tiny" and data["dtype"] == "float32"
    assert len(data["cases"]) == len(result["cases"])
    md = paths["md"].read_text()
    for m in METHODS:
        assert f"| {m} |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_lists_each_method_at_90(result):
    table = report.summary([result]).splitlines()
    rows = [line for line in table[2:] if line.startswith("|")]
    assert [line.split(" | ")[2] for line in rows] == METHODS[1:]  # none is the reference
    assert all("(tiny)" in line for line in rows)


def test_cli_writes_results(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # differs from --threads 1 below, so restoring it is visible
    try:
        rc = main(
            [
                "--arch",
                "llava-1.5-7b",
                "--scale",
                "tiny",
                "--device",
                "cpu",
                "--rates",
                "0.75",
                "--methods",
                "sample",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--new-tokens",
                "1",
                "--turns",
                "2",
                "--machine",
                "m",
                "--out",
                str(tmp_path),
            ]
        )
        assert torch.get_num_threads() == 2  # the run's thread count does not leak out
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    data = json.loads((tmp_path / "m-llava-1.5-7b-tiny.json").read_text())
    assert [c["method"] for c in data["cases"]] == ["none", "sample"]
    assert data["command"].startswith("python -m bench --arch llava-1.5-7b --scale tiny")
    assert "rate 0.9 not benchmarked" in data["targets"]["note"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rates=[0.9, 1.0]), "--rates"),
        (dict(rates=[float("nan")]), "--rates"),
        (dict(methods=["none", "nope"]), "nope"),
        (dict(repeats=0), "--repeats"),
        (dict(scale="real"), "CUDA"),
        (dict(scale="huge"), "--scale='huge'"),
        (dict(threads=0), "--threads"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(device="cpu", rates=[0.5], methods=["none"], repeats=1, warmup=0) | kwargs
    scale = args.pop("scale", "tiny")
    with pytest.raises(ValueError, match=match):
        inference.run("llava-1.5-7b", scale, **args)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="--arch"):
        shapes.get_arch("llava-99b")


@pytest.mark.parametrize("arch", sorted(shapes.ARCHS))
def test_shapes_build_and_count_tokens(arch):
    spec = shapes.get_arch(arch)
    real = shapes.build_config(spec, "real").get_text_config()
    assert real.hidden_size >= 3584 and real.num_hidden_layers >= 28  # the 7B shapes
    model = shapes.build_model(spec, "tiny")
    inputs = shapes.make_inputs(model, spec)
    n = shapes.visual_token_count(inputs, model.config.image_token_id)
    # LLaVA: 24x24; LLaVA-NeXT 672x672: base 576 + 48x48 crops + 48 newlines; Qwen: 48x48 / 4.
    assert n == {"llava-1.5-7b": 576, "llava-next-7b": 2928, "qwen2-vl-7b": 576}[arch]


def test_clock_and_peak_memory_on_cpu():
    clock = inference.Clock(torch.device("cpu"))
    clock.mark("a")
    clock.mark("b")
    clock.mark("c")
    t = clock.intervals()
    assert list(t) == ["b", "c"] and all(v >= 0 for v in t.values())
    with inference.PeakMemory(torch.device("cpu")) as mem:
        # 128 MiB: above glibc's largest mmap threshold (32 MiB), so these are fresh pages, not
        # memory an earlier test freed and the allocator kept resident.
        x = torch.ones(128 * 2**20 // 4)
        del x
    assert mem.peak_mb > 0
    if mem.method.startswith("VmHWM"):
        # The peak saw the whole buffer although it was freed before the block ended; 8 MiB of
        # slack covers RSS drift from other allocations in between.
        assert mem.delta_mb >= 120


@pytest.mark.parametrize(
    ("arch", "billions"),
    # Published sizes: LLaVA-1.5-7B and LLaVA-NeXT-7B 7.06B, Qwen2-VL-7B 8.29B parameters.
    [("llava-1.5-7b", 7.06), ("llava-next-7b", 7.06), ("qwen2-vl-7b", 8.29)],
)
def test_real_shapes_match_published_sizes(arch, billions):
    # On the meta device: no memory, no init, just the parameter shapes the GPU run would build.
    model = shapes.build_model(shapes.get_arch(arch), "real", device="meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert params == pytest.approx(billions, abs=0.01)  # published sizes are given to 0.01B
    assert model.dtype == torch.bfloat16
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_any_rate_cost_times_every_configuration(tmp_path, capsys):
    """bench.any_rate_cost: each per-rate cell and the any-rate run timed, the budgets' wall
    times derived from them, the ideal ratio exact."""
    from bench import any_rate_cost

    any_rate_cost.main(
        ["--steps", "1", "--rounds", "2", "--dialogues", "4", "--batch-size", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    (path,) = tmp_path.glob("any-rate-cost-tiny-llava-*.json")
    res = json.loads(path.read_text())
    assert set(res["s_per_step"]) == {"cell 0.5", "cell 0.75", "cell 0.9", "any"}
    assert all(len(v["rounds"]) == 2 and v["median"] > 0 for v in res["s_per_step"].values())
    per_rate = sum(600 * res["s_per_step"][f"cell {r}"]["median"] for r in (0.5, 0.75, 0.9))
    assert res["per_rate_s"] == pytest.approx(per_rate)
    assert res["ratio"] == pytest.approx(res["any_rate_s"] / per_rate)
    assert res["ideal_ratio"] == pytest.approx(1200 / 1800)
    assert "ratio" in capsys.readouterr().out
