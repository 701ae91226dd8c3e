"""Data-parallel training (``mc_core.training.distributed``): two gloo processes take the steps of
one.

The gradient of each step is split across ranks by dialogues and summed back, so two processes
on the same global batch must end where one process ends, up to float summation order. CPU only:
the processes are spawned here and meet through a file rendezvous, no network.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import build_llava
from safetensors.torch import load_file, save_file
from test_train import tiny_dataset

from mc_core.compressors import build
from mc_core.runtime import prepare_model
from mc_core.training import distributed
from mc_core.training.config import TrainConfig
from mc_core.training.loop import _Run, train
from mc_core.training.targets import build_target_cache

pytestmark = pytest.mark.usefixtures("one_thread")

# 7 dialogues in batches of 3: shards of 2 + 1 dialogues, and the epoch's last batch of one
# dialogue leaves rank 1 without any (it must still join the all-reduces).
N, STEPS, WORLD = 7, 5, 2


def _cfg(**kw) -> TrainConfig:
    base = dict(
        lr=0.5,
        momentum=0.9,
        grad_clip=1e-2,
        batch_size=3,
        epochs=2,
        max_steps=STEPS,
        compressor_kwargs={"d_c": 16},
        checkpoint_every=2,
        log_every=1,
        progress=False,
        device="cpu",
        lambda_ent=0.1,
        lambda_col=0.1,
    )
    return TrainConfig(**{**base, **kw})


def _setup():
    model, processor = build_llava()
    data = tiny_dataset(N)
    cache = build_target_cache(model, processor, data, batch_size=N, progress=False, device="cpu")
    return model, processor, data, cache


_SHARED: dict = {}  # the parent's model, data and cache, inherited by the forked ranks


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world
    )
    try:
        model, processor, data, cache = _SHARED["setup"]
        log: list[float] = []
        state = f"{root}/state"  # shared: rank 0 writes, every rank resumes from it
        # Interrupted after 3 steps, then resumed to STEPS: resume works across ranks too. The
        # ranks accumulate micro-batches of one dialogue: composed with the split across ranks,
        # still the one-process step on the whole batch.
        cfg, first = _cfg(micro_batch=1), _cfg(max_steps=3, micro_batch=1)
        train(first, model, processor, data, rate=0.75, out_dir=state, cache=cache)
        comp = train(
            cfg,
            model,
            processor,
            data,
            rate=0.75,
            out_dir=state,
            cache=cache,
            callbacks=[lambda s, m: log.append(m["loss"])],
        )
        save_file({k: v.contiguous() for k, v in comp.state_dict().items()}, f"{root}/w{rank}.st")
        with open(f"{root}/loss{rank}.json", "w") as fh:
            json.dump(log, fh)
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_steps_of_one(tmp_path):
    model, processor, data, cache = _SHARED["setup"] = _setup()
    log: list[float] = []
    one = train(
        _cfg(),
        model,
        processor,
        data,
        rate=0.75,
        cache=cache,
        callbacks=[lambda s, m: log.append(m["loss"])],
    )
    # fork, not spawn: the ranks inherit the imported modules and the built model (a spawned
    # rank re-imports torch and transformers, most of this test's time on a busy machine).
    mp.start_processes(
        _worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork"
    )

    w = [load_file(str(tmp_path / f"w{r}.st")) for r in range(WORLD)]
    losses = [json.loads((tmp_path / f"loss{r}.json").read_text()) for r in range(WORLD)]
    # The replicas apply the same summed gradient: identical, bit for bit.
    assert losses[0] == losses[1] and len(losses[0]) == STEPS - 3
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), k
    # Against one process: the same maths in another summation order (per-rank padding widths
    # change the matmul shapes; token sums are split by rank; lambdas are rescaled), float32
    # rounding (~6e-8 relative) per operation. Measured: weights 1.5e-8 max |diff|, losses
    # 3e-8; the bounds leave ~60x, far below what one changed dialogue or a missing 1/T does.
    for k, v in one.state_dict().items():
        torch.testing.assert_close(w[0][k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(log[3:]), rtol=1e-5, atol=0)
    init = build("metacompress", rate=0.75, dim=64, d_c=16, seed=0)
    assert not torch.equal(init.w_q, w[0]["w_q"])  # the runs did train


def test_shard_splits_in_order():
    items = list(range(7))
    for world in (1, 2, 3, 8):
        parts = [distributed.shard(items, r, world) for r in range(world)]
        assert sum(parts, []) == items  # concatenated in rank order: the one-process order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_backend_auto_and_bad_backend_names_the_key():
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match=r"train\.distributed\.backend='nccl'"):
        distributed.resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"train\.distributed\.nproc_per_node=0"):
        TrainConfig(distributed={"nproc_per_node": 0})


def test_only_the_generator_gets_gradients():
    """The student forward backpropagates through the frozen LVLM into inputs_embeds, but the
    frozen weights take no gradient (no memory for it): only the generator's do."""
    model, processor, data, cache = _SHARED.get("setup") or _setup()
    run = _Run.start(_cfg(), model, processor, data, rate=0.75, cache=cache, adapter=None)
    run.step([0, 1, 2], 0, None)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert run.params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.params)


def test_dtype_auto_is_float32_on_cpu():
    model, _ = build_llava()
    prepare_model(model, torch.device("cpu"), "auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    prepare_model(model, torch.device("cpu"), "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"train\.dtype='half'"):
        TrainConfig(dtype="half")


def test_stage_reruns_itself_under_torchrun(monkeypatch):
    """nproc_per_node > 1: tasks.train starts torchrun on its own module and arguments (so
    `dvc repro` runs it unchanged) and waits; a torchrun rank, or one process, trains itself."""
    from tasks import train as stage

    calls = []
    codes = iter([0, 3])
    monkeypatch.setattr(
        stage.subprocess,
        "run",
        lambda cmd, check: calls.append(cmd) or SimpleNamespace(returncode=next(codes)),
    )
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg, argv = TrainConfig(distributed={"nproc_per_node": 2}), ["--arch", "a", "--rate", "0.5"]
    assert stage._relaunch(cfg, argv)
    assert calls[0][1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tasks.train",
        *argv,
    ]
    with pytest.raises(SystemExit) as failed:  # a failing rank fails the stage
        stage._relaunch(cfg, argv)
    assert failed.value.code == 3
    assert not stage._relaunch(TrainConfig(), argv)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not stage._relaunch(cfg, argv) and len(calls) == 2
