"""The real-width training benchmark (bench.scale) and the GPU acceptance script
(bench.gpu_acceptance) run end to end at tiny widths on the CPU and write well-formed results.

No assertion on the measured-to-estimated ratio or on timings: at tiny widths the peak is a few
MiB, within the resident-set noise of a Python process; the real-width run checks the band.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_acceptance, scale

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    cmd = [sys.executable, "-m", "bench.scale", "--tiny", "--dialogues", "2", "--steps", "2"]
    cmd += ["--cases", "plain-store", "checkpointed-store", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    (path,) = out.glob("scale-*.json")
    return json.loads(path.read_text())


def test_scale_cases_carry_estimate_measurement_and_store(scale_result):
    res = scale_result
    assert res["arch"] == "llava-1.5-7b" and res["scale"] == "tiny"
    assert "clear_refs" in res["peak_measured_how"]
    assert [c["case"] for c in res["cases"]] == ["plain-store", "checkpointed-store"]
    for c in res["cases"]:
        assert c["estimated_peak_gib"] > 0 and c["measured_peak_gib"] > 0
        assert c["ratio"] == pytest.approx(
            c["estimated_peak_gib"] / c["measured_peak_gib"], rel=1e-2
        )
        assert c["step_s"] > 0 and c["measured"]["steps_measured"] == 1
        assert c["store_bytes_per_dialogue"] > 0
        # The estimator's inputs are the dialogues' compressed shapes at rate 0.5: 576 -> 288.
        assert c["shapes"]["visual_tokens"] == [576, 288] and c["shapes"]["images"] == 1
        assert c["estimate_inputs"]["seq_len"] == c["shapes"]["seq_len"]
    plain, ckpt = res["cases"]
    assert ckpt["estimated_peak_gib"] < plain["estimated_peak_gib"]
    assert set(res["acceptance"]) == {"ratio_within_band", "checkpointing_saves_memory", "pass"}


def test_scale_child_argv_drops_the_case_selection():
    argv = ["--tiny", "--cases", "plain-store", "checkpointed-store", "--out", "x"]
    assert scale._child_argv(argv, "plain-recompute")[3:] == [
        "--tiny",
        "--out",
        "x",
        "--child",
        "plain-recompute",
    ]


def test_scale_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="micro-batch=4"):
        scale.parse_args(["--micro-batch", "4", "--batch-size", "2"])
    with pytest.raises(SystemExit, match="steps=1"):
        scale.parse_args(["--steps", "1"])


def test_gpu_acceptance_tiny_writes_training_and_ttft(tmp_path):
    res = gpu_acceptance.main(["--tiny", "--out", str(tmp_path), "--arch", *gpu_acceptance.ARCHS])
    (path,) = tmp_path.glob("gpu-*.json")
    assert json.loads(path.read_text()) == res
    assert res["complete"] and [a["arch"] for a in res["archs"]] == list(gpu_acceptance.ARCHS)
    for a in res["archs"]:
        tr = a["training"]
        assert tr["estimated_peak_gib"] > 0 and tr["measured_peak_gib"] > 0
        assert tr["micro_batch"] == tr["batch_size"] == 4  # "auto" on the CPU: the whole batch
        assert tr["step_s"] > 0 and len(tr["losses"]) == 2
        methods = a["ttft"]["methods"]
        assert set(methods) == {"none", *gpu_acceptance.TTFT_METHODS}
        assert methods["none"]["visual_tokens"] == 576
        for m in gpu_acceptance.TTFT_METHODS:  # rate 0.9 keeps ceil(0.1 * 576) = 58
            assert methods[m]["visual_tokens"] == 58 and methods[m]["ttft_ms"] > 0


def test_gpu_acceptance_needs_cuda_without_tiny(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_acceptance._device(tiny=False)
