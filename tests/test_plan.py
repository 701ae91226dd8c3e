"""The cost plan (mc_core.training.plan, python -m tasks.plan, metacompress plan): the paper's
7B grid fits one 80 GB GPU at batch 36 with the fitted micro-batch, the FLOP and time model's
parts, multi-GPU splitting, the disk model against a written target store, the offline configs
and shapes, the entry points, and the tables docs/pipeline.md prints. Configs on the meta
device; no network, no GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_llava
from test_train import tiny_dataset

from mc_core.data import schema
from mc_core.inference.flops import prefill_flops
from mc_core.models import zoo
from mc_core.training import fit, memory, plan
from mc_core.training.config import TrainConfig
from mc_core.training.plan_inputs import ArchInput, Assumptions, arch_input, real_config
from mc_core.training.targets import build_target_cache, save_target_cache

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper-grid.yaml"
RATES = [0.5, 0.75, 0.9]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paper():
    """The paper grid's inputs (shapes assumed: real models) and meta models, built once."""
    from tasks import params as tparams

    p = tparams.load(PAPER)
    inputs = [arch_input(a, data_dir=None) for a in p.grid.archs]
    return p, inputs, {}


def _paper_plan(paper, gpu: str, gpus: int) -> dict:
    p, inputs, models = paper
    setup = plan.Setup(plan.get_gpu(gpu), gpus=gpus)
    return plan.plan_grid(
        inputs,
        list(p.grid.rates),
        p.train.for_cell,
        dialogues=p.data.train.dialogues,
        setup=setup,
        models=models,
    )


@pytest.mark.parametrize(("gpu", "gpus"), [("h100", 1), ("a6000", 4)])
def test_every_paper_cell_fits_with_the_fitted_micro_batch(paper, gpu, gpus):
    result = _paper_plan(paper, gpu, gpus)
    _, inputs, models = paper
    budget = fit.usable_bytes(plan.get_gpu(gpu).memory)
    per_rank = math.ceil(36 / gpus)
    assert len(result["cells"]) == 4 * 3
    for cell in result["cells"]:
        assert cell["fits"] and cell["note"] == "", cell
        assert 1 <= cell["micro_batch"] <= per_rank == cell["per_rank_batch"]
        assert cell["peak_bytes"] <= budget == cell["budget_bytes"]
        if cell["micro_batch"] < per_rank:  # the largest that fits: one more does not
            inp = next(i for i in inputs if i.arch == cell["arch"])
            est = memory.estimate(
                models[cell["arch"]],
                batch_size=cell["micro_batch"] + 1,
                seq_len=cell["seq_len"],
                answer_tokens=inp.answer_tokens,
                generator_params=_generator_params(cell["rate"], inp),
                visual_tokens=(inp.visual_tokens, cell["kept"]),
            )
            assert est["total"] > budget
    # The claim of docs/pipeline.md for one 80 GB GPU, at the assumed dialogue shapes:
    if gpu == "h100":
        cells = {(c["arch"], c["rate"]): c for c in result["cells"]}
        for arch in ("llava-1.5-7b", "qwen2-vl-7b"):
            for rate in RATES:
                assert cells[arch, rate]["fits"]
            assert cells[arch, 0.9]["micro_batch"] == 36  # the whole batch at rate 0.9


def _generator_params(rate: float, inp: ArchInput) -> int:
    from mc_core.compressors import build

    d = inp.config.get_text_config().hidden_size  # metacompress at its defaults (d_c 64)
    return sum(p.numel() for p in build("metacompress", rate=rate, dim=d).parameters())


def test_docs_print_the_paper_plans(paper):
    """docs/pipeline.md shows these tables; the one command there reproduces them."""
    doc = (ROOT / "docs" / "pipeline.md").read_text()
    for gpu, gpus in (("h100", 1), ("a6000", 4)):
        text = plan.format_plan(_paper_plan(paper, gpu, gpus), label=str(PAPER.relative_to(ROOT)))
        for line in text.splitlines():
            if line.startswith("| ") and "@" in line:  # every cell row
                assert line in doc, f"docs/pipeline.md lacks the {gpu} x {gpus} row: {line}"


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_llava()
    n = 64
    inp = ArchInput("tiny", model.config, n, 40, 6, 1, "test")
    return model, processor, inp


def _cell(tiny, *, gpus=1, backward=2.0, **train):
    model, _, inp = tiny
    setup = plan.Setup(plan.get_gpu("h100"), gpus=gpus, backward_factor=backward)
    cfg = TrainConfig(**{"batch_size": 36, **train})
    return plan.plan_cell(inp, 0.75, cfg, dialogues=1000, setup=setup, model=model)


def test_flops_parts_and_multi_gpu(tiny):
    model, _, inp = tiny
    base = _cell(tiny)
    seq, answers = base["seq_len"], inp.answer_tokens
    assert seq == 40 + base["kept"] and base["kept"] == 16
    assert base["steps"] == 2 * math.ceil(1000 / 36)
    fwd = prefill_flops(model.config, seq, logits_positions=answers)
    # backward = factor x forward
    assert _cell(tiny, backward=1.0)["flops_per_step"] == pytest.approx(
        base["flops_per_step"] - 36 * fwd
    )
    # checkpointing: one more forward of the decoder layers (no LM head)
    ckpt = _cell(tiny, activation_checkpointing=True)
    layers = prefill_flops(model.config, seq, logits_positions=0)
    assert ckpt["flops_per_step"] == pytest.approx(base["flops_per_step"] + 36 * layers)
    assert ckpt["peak_bytes"] < base["peak_bytes"]
    # recompute: the vision tower per image, every step
    rec = _cell(tiny, visual_tokens="recompute")
    tower = plan.tower_flops(model.config, inp.visual_tokens)
    assert tower > 0
    assert rec["flops_per_step"] == pytest.approx(base["flops_per_step"] + 36 * tower)
    # data parallel: ceil(batch / N) per rank; wall time of the slowest rank, GPU-h = wall x N
    four, five = _cell(tiny, gpus=4), _cell(tiny, gpus=5)
    assert four["per_rank_batch"] == 9 and five["per_rank_batch"] == 8
    assert four["wall_h"] == pytest.approx(base["wall_h"] / 4)
    assert four["gpu_h"] == pytest.approx(base["gpu_h"])
    assert five["wall_h"] == pytest.approx(base["wall_h"] * 8 / 36)
    assert five["gpu_h"] == pytest.approx(five["wall_h"] * 5)
    assert base["gpu_h"] == pytest.approx(
        base["steps"] * 36 * base["flops_per_step"] / 36 / (989.4e12 * 0.35) / 3600
    )


def test_any_rate_plan(tiny):
    model, _, inp = tiny
    setup = plan.Setup(plan.get_gpu("h100"))
    kw = dict(dialogues=1000, setup=setup, model=model)

    def cell(rate, cfg):
        return plan.plan_cell(inp, rate, cfg, **kw)

    cfg = TrainConfig(batch_size=36, micro_batch=5, rates=[0.5, 0.75, 0.9])
    got = plan.plan_any(inp, cfg, **kw)
    ends = [cell(r, cfg) for r in (0.5, 0.75, 0.9)]
    # Memory of the costliest step (the lowest rate keeps the most tokens), cost the mean
    # over the set's members, drawn equally.
    assert (got["rate"], got["rates"]) == ("any", [0.5, 0.75, 0.9])
    assert (got["kept"], got["peak_bytes"]) == (ends[0]["kept"], ends[0]["peak_bytes"])
    assert ends[0]["kept"] > ends[2]["kept"]
    mean = sum(c["flops_per_step"] for c in ends) / 3
    assert got["flops_per_step"] == pytest.approx(mean)
    assert got["gpu_h"] == pytest.approx(sum(c["gpu_h"] for c in ends) / 3)
    assert got["train_flops"] == pytest.approx(got["steps"] * mean)
    # A range: the mean over the uniform draw, strictly between its ends' costs.
    ranged = plan.plan_any(inp, cfg.model_copy(update={"rates": [0.5, 0.9]}), **kw)
    assert ends[2]["flops_per_step"] < ranged["flops_per_step"] < ends[0]["flops_per_step"]
    with pytest.raises(ValueError, match="train.rates"):
        plan.plan_any(inp, TrainConfig(), **kw)
    # In a grid: listed under "any", counted in the totals, printed with its span.
    grid = plan.plan_grid(
        [inp],
        RATES,
        lambda a, r: cfg.model_copy(update={"rates": None}),
        any_for=lambda a: cfg,
        any_archs=["tiny"],
        dialogues=1000,
        setup=setup,
        models={"tiny": model},
    )
    assert [a["arch"] for a in grid["any"]] == ["tiny"]
    cells_h = sum(c["gpu_h"] for c in grid["cells"]) + grid["archs"][0]["build_gpu_h"]
    assert grid["total_gpu_h"] == pytest.approx(cells_h + grid["any"][0]["gpu_h"])
    assert "| tiny @ any (0.5-0.9) | <= 32 |" in plan.format_plan(grid)
    with pytest.raises(ValueError, match="any_archs: \\['other'\\]"):
        plan.plan_grid([inp], RATES, None, any_archs=["other"], dialogues=10, setup=setup)


def test_micro_batch_settings(tiny):
    model, _, inp = tiny
    whole = _cell(tiny)
    assert (whole["micro_batch"], whole["accumulation"], whole["fits"]) == (36, 1, True)
    fixed = _cell(tiny, micro_batch=5)
    assert (fixed["micro_batch"], fixed["accumulation"]) == (5, 8)
    # A budget (train.max_memory_gib) between the estimates of 7 and 8 dialogues picks 7.
    kw = dict(seq_len=whole["seq_len"], answer_tokens=6, visual_tokens=(64, 16))
    params = _generator_params(0.75, inp)
    at = [
        memory.estimate(model, batch_size=k, generator_params=params, **kw)["total"] for k in (7, 8)
    ]
    gib = (at[0] + at[1]) / 2 / 1024**3
    auto = _cell(tiny, micro_batch="auto", max_memory_gib=gib)
    assert (auto["micro_batch"], auto["accumulation"], auto["fits"]) == (7, 6, True)
    none = _cell(tiny, max_memory_gib=gib)  # micro_batch null: the whole batch does not fit
    assert not none["fits"] and "set auto" in none["note"]
    tight = _cell(tiny, micro_batch=8, max_memory_gib=gib)
    assert not tight["fits"] and "micro_batch=8" in tight["note"]
    nothing = _cell(tiny, micro_batch="auto", max_memory_gib=1e-6)
    assert (
        nothing["micro_batch"] == 0
        and not nothing["fits"]
        and "micro-batch of 1" in nothing["note"]
    )


def test_disk_model_against_a_written_store(tiny, tmp_path):
    model, processor, _ = tiny
    cache = build_target_cache(
        model, processor, tiny_dataset(8), batch_size=4, progress=False, device="cpu"
    )
    es = cache.entries
    n = max(len(t) for e in es for t in e.tokens)
    inp = ArchInput(
        "t",
        model.config,
        n,
        max(e.length - n for e in es),
        max(len(e.positions) for e in es),
        1,
        "",
    )
    save_target_cache(cache, tmp_path / "store")
    written = sum(f.stat().st_size for f in (tmp_path / "store").iterdir())
    setup = plan.Setup(plan.get_gpu("h100"))
    a = plan.plan_arch(inp, TrainConfig(dtype="float32"), dialogues=8, setup=setup)
    # Measured 0.96x: the plan counts the longest dialogue; the store adds its headers.
    assert 0.85 < (a["token_store_bytes"] + a["targets_bytes"]) / written < 1.2
    assert a["token_store_bytes"] == 8 * n * 64 * 4  # X: n x d float32 per image
    bf16 = plan.plan_arch(inp, TrainConfig(), dialogues=8, setup=setup)  # auto on a GPU: bf16
    assert bf16["token_store_bytes"] * 2 == a["token_store_bytes"]
    rec = plan.plan_arch(inp, TrainConfig(visual_tokens="recompute"), dialogues=8, setup=setup)
    assert rec["token_store_bytes"] == 0 and rec["targets_bytes"] == bf16["targets_bytes"]
    teacher = plan.plan_arch(inp, TrainConfig(targets="teacher"), dialogues=8, setup=setup)
    assert teacher["build_flops"] > bf16["build_flops"]


def test_tower_flops_of_qwen2_vl():
    cfg = real_config("qwen2-vl-7b")
    n, t, h, i = 391, 4 * 391, 1280, 5120  # 2 x 2 patches merge into one token
    assert memory.tower_tokens(cfg, n) == t
    assert plan.tower_flops(cfg, n) == 32 * (2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h)
    llava = real_config("llava-1.5-7b")  # CLIP-L/336: attention within the 576-patch image
    assert plan.tower_flops(llava, 576) == 24 * (
        2 * 576 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 576 * 576 * 1024
    )


def test_real_configs_and_assumed_shapes():
    from mc_core.models import families

    for name, spec in zoo.REAL.items():
        cfg = real_config(name)
        assert families.for_config(cfg).name == spec.family, name
    # The published InternVL3-8B: 7.94 B parameters (Qwen2.5-7B, InternViT-300M, projector).
    params = sum(p.numel() for p in memory.meta_model(real_config("internvl3-8b")).parameters())
    assert 7.90e9 < params < 7.98e9, params
    got = {n: arch_input(n, data_dir=None).visual_tokens for n in ("llava-1.5-7b", "qwen2-vl-7b")}
    # 640 x 480: LLaVA-1.5 resizes to 336 (24 x 24); Qwen2-VL 476 x 644 px -> 17 x 23 tokens
    assert got == {"llava-1.5-7b": 576, "qwen2-vl-7b": 17 * 23}
    a = Assumptions()
    inp = arch_input("llava-1.5-7b", data_dir=None)
    assert (inp.text_tokens, inp.answer_tokens) == (a.text_tokens, a.answer_tokens) == (155, 12)
    assert inp.source.startswith("assumed: 3 turns")
    with pytest.raises(ValueError, match="arch='gpt-9'"):
        arch_input("gpt-9", data_dir=None)
    with pytest.raises(ValueError, match="turns=0"):
        Assumptions(turns=0)


def test_measured_shapes_are_the_caches(tiny, tmp_path):
    model, processor, _ = tiny
    zoo.save(model, processor, tmp_path / "base" / "mini")
    data = tiny_dataset(6)
    schema.save(data, tmp_path / "train")
    inp = arch_input("mini", base_dir=tmp_path / "base", data_dir=tmp_path / "train", sample=6)
    cache = build_target_cache(model, processor, data, batch_size=6, progress=False, device="cpu")
    es = cache.entries
    assert inp.visual_tokens == 64 and inp.images_per_dialogue == 1
    assert inp.text_tokens == max(e.length - 64 for e in es)
    assert inp.answer_tokens == max(len(e.positions) for e in es)
    assert inp.source == f"{tmp_path / 'train'}: 6 of 6 dialogues encoded (seed 0)"


def test_gpus_and_setup():
    assert plan.get_gpu("H100") is plan.GPUS["h100"] is plan.get_gpu("nvidia-h100-sxm")
    assert plan.get_gpu("RTX A6000").tflops == 154.8
    with pytest.raises(ValueError, match="--gpu='v100'"):
        plan.get_gpu("v100", where="--gpu")
    for bad in (dict(gpus=0), dict(utilization=0.0), dict(utilization=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            plan.Setup(plan.GPUS["h100"], **bad)
    with pytest.raises(ValueError, match="dialogues=0"):
        plan.plan_grid([], RATES, None, dialogues=0, setup=plan.Setup(plan.GPUS["h100"]))


def test_tasks_plan_reads_the_params(capsys):
    from tasks import plan as tplan

    assert tplan.main(["--json"]) == 0  # params.yaml, validated as the stages read it
    out = json.loads(capsys.readouterr().out)
    from tasks import params as tparams

    p = tparams.load(ROOT / "params.yaml")
    assert {(c["arch"], c["rate"]) for c in out["cells"]} == set(p.grid.cells())
    assert [a["arch"] for a in out["any"]] == list(p.grid.any_rate_archs)
    assert out["dialogues"] == p.data.train.dialogues and out["setup"]["gpus"] == 1
    assert tplan.main(["--profile", "smoke", "--gpu", "a6000", "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    assert "| tiny-llava @ 0.5 |" in text and "2 x RTX A6000" in text and "@ 0.75" not in text
    assert tplan.main(["--gpu", "v100"]) == 2
    assert "--gpu='v100'" in capsys.readouterr().err
    assert tplan.main(["--params", "nope.yaml"]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_metacompress_plan(capsys):
    from mc_cli.main import main

    args = ["plan", "--model", "qwen2-vl-7b", "--rates", "0.9", "--gpu", "a6000", "--gpus", "4"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (cell,) = out["cells"]
    assert (cell["arch"], cell["per_rank_batch"], cell["fits"]) == ("qwen2-vl-7b", 9, True)
    assert out["dialogues"] == 20000 and out["epochs"] == 2 and out["batch_size"] == 36
    assert main(["plan", "--params", "params.yaml", "--model", "x"]) == 2
    assert "leave out --model" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert main(["plan", "--model", "gpt-9"]) == 2
    assert "arch='gpt-9'" in capsys.readouterr().err


def test_metacompress_plan_of_a_params_file_runs_tasks_plan():
    """--params runs `python -m tasks.plan` (the front-end does not import the pipeline)."""
    run = subprocess.run(
        [sys.executable, "-m", "mc_cli", "plan", "--params", "params.yaml", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["cells"]) == 6
