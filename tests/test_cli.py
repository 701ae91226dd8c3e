"""`metacompress`: help, chat transcripts, embeddings export, evaluation, registry, errors."""

from __future__ import annotations

import io
import re
import shutil
import sys
from pathlib import Path

import datasets
import pytest
from conftest import TINY, make_image

from mc_cli.main import build_parser, main
from mc_core.compressors import build
from mc_core.inference.conversation import Conversation
from mc_core.models import zoo
from mc_core.runtime import token_dim

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what colour is at row 1 col 2 ?", "how many red circle ?", "is there a blue square ?"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved tiny models (llava, qwen2_vl) and an image file."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for family in ("llava", "qwen2_vl"):
        model, processor = TINY[family]()
        out[family] = zoo.save(model, processor, root / family)
    out["image"] = root / "img.png"
    make_image(48, 64, seed=5).save(out["image"])
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in ("chat", "compress", "evaluate", "list"):
        assert re.search(rf"^\s+{command}\s", text, re.M), command
    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("chat", "compress", "evaluate"):
        assert "--model" in sub[command].format_help()


def test_chat_transcript_matches_conversation(saved, capsys):
    code, out, _ = _run(
        capsys,
        "chat",
        saved["image"],
        "--model",
        saved["llava"],
        "--compressor",
        "sample",
        "--rate",
        "0.75",
        "--max-new-tokens",
        "3",
        *sum((["-q", q] for q in QUESTIONS), []),
    )
    assert code == 0
    turns = re.findall(r"^\[turn (\d)\] tokens kept (\d+)/(\d+) \| prefill [\d.]+ ms$", out, re.M)
    assert turns == [(str(k), "16", "64") for k in (1, 2, 3)]  # 64 tokens at rate 0.75 -> 16
    answers = re.findall(r"^A: (.*)$", out, re.M)
    model, processor = zoo.load(saved["llava"])
    conv = Conversation(
        model,
        processor,
        build("sample", rate=0.75, dim=token_dim(model)),
        images=make_image(48, 64, seed=5),
        max_new_tokens=3,
    )
    assert answers == [conv.ask(q) for q in QUESTIONS]


def test_chat_reads_stdin_lines(saved, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("how many ?\n\nwhat colour ?\n"))
    code, out, _ = _run(capsys, "chat", saved["image"], "--model", saved["llava"])
    assert code == 0
    assert re.findall(r"^Q: (.*)$", out, re.M) == ["how many ?", "what colour ?"]
    assert "tokens kept 64/64" in out  # no compressor: every visual token


def test_compress_writes_engine_embeddings(saved, tmp_path, capsys):
    from mc_core.inference.embeds import load_embeds

    out = tmp_path / "emb.safetensors"
    code, text, _ = _run(
        capsys,
        "compress",
        saved["image"],
        "--model",
        saved["qwen2_vl"],
        "--compressor",
        "pool",
        "--rate",
        "0.5",
        "-o",
        out,
    )
    assert code == 0 and str(out) in text
    emb = load_embeds(out)
    t, h, w = emb.grid_thw
    assert emb.m == h * w // 4 and t == 1 and emb.m < emb.n  # the engine's grid holds m tokens
    assert emb.embeds.shape[1] == 64


def _dataset(path: Path) -> Path:
    rows: dict[str, list] = {
        k: []
        for k in (
            "dialogue_id",
            "source",
            "image_id",
            "image",
            "questions",
            "answers",
            "answer_sets",
            "question_types",
            "targets",
        )
    }
    for i in range(3):
        buf = io.BytesIO()
        make_image(64, 64, seed=i).save(buf, format="PNG")
        for key, value in (
            ("dialogue_id", f"d{i}"),
            ("source", "synthetic"),
            ("image_id", f"i{i}"),
            ("image", {"bytes": buf.getvalue(), "path": None}),
            ("questions", QUESTIONS),
            ("answers", ["red", "2", "yes"]),
            ("answer_sets", [["red"], ["2"], ["yes"]]),
            ("question_types", ["colour", "count", "exist"]),
            ("targets", ["", "", ""]),
        ):
            rows[key].append(value)
    from mc_core.data import schema

    return schema.save(datasets.Dataset.from_dict(rows, features=schema.FEATURES), path)


def test_evaluate_prints_per_turn_accuracy(saved, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    code, out, _ = _run(
        capsys,
        "evaluate",
        "--model",
        saved["llava"],
        "--data",
        data,
        "--methods",
        "none",
        "sample",
        "--rate",
        "0.75",
        "--json",
        tmp_path / "m.json",
    )
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:4]}
    assert set(rows) == {"none", "sample"}
    assert rows["sample"][-1] == "16.0" and rows["none"][-1] == "64.0"  # visual tokens
    assert all(0.0 <= float(a) <= 1.0 for a in rows["none"][:4])
    assert (tmp_path / "m.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "nope.png", "--model", "{llava}", "-q", "hi ?"], "IMAGE 'nope.png': no such"),
        (["chat", "{image}", "--model", "no/such/model", "-q", "hi ?"], "--model 'no/such/model'"),
        (
            ["chat", "{image}", "--model", "{llava}", "--compressor", "zipzap", "--rate", "0.5"],
            "--compressor 'zipzap': not a method",
        ),
        (["chat", "{image}", "--model", "{llava}", "--compressor", "sample"], "give --rate"),
        (
            [
                "chat",
                "{image}",
                "--model",
                "{llava}",
                "--compressor",
                "metacompress",
                "--rate",
                "0.5",
            ],
            "must be trained",
        ),
        (
            [
                "compress",
                "{image}",
                "--model",
                "{llava}",
                "--compressor",
                "fastv",
                "--rate",
                "0.5",
                "-o",
                "x.safetensors",
            ],
            "prompt-dependent",
        ),
        (
            [
                "evaluate",
                "--model",
                "{llava}",
                "--data",
                "no/data",
                "--methods",
                "none",
                "--rate",
                "0.5",
            ],
            "--data 'no/data': no such folder",
        ),
        (["list"], "no MLflow registry at sqlite:///"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(
    saved, capsys, monkeypatch, tmp_path, argv, message
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/absent.db")
    argv = [a.format(llava=saved["llava"], image=saved["image"]) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err
    assert not (tmp_path / "absent.db").exists()  # `list` must not create a registry


def test_rate_out_of_range_is_a_usage_error(saved, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(saved["image"]), "--model", str(saved["llava"]), "--rate", "1.5"])
    assert exit_.value.code == 2
    assert "rate must be in (0, 1)" in capsys.readouterr().err


def test_registry_champion_lists_and_chats(saved, tmp_path, capsys, monkeypatch):
    """`list` shows a registered compressor's champion; `chat` loads it by models:/…@champion."""
    import mc_registry
    from mc_core.compressors.checkpoint import save_compressor
    from tasks import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv(mc_registry.ENV_URI, uri)
    monkeypatch.chdir(tmp_path)
    mc_registry.migrate(uri)
    comp = build("metacompress", rate=0.75, dim=64)
    ckpt = save_compressor(tmp_path / "ckpt", comp, meta={"family": "llava"})
    run = tracking.start_cell_run("exp", "tiny-llava", "0.75", params={}, tags={}, uri=uri)
    tracking.log_metrics(run, {"eval/acc_avg": 0.5}, uri=uri)
    tracking.register_checkpoint("mc-tiny", ckpt, run_id=run, score=0.5, metric="acc_avg", uri=uri)
    code, out, _ = _run(capsys, "list")
    assert code == 0
    assert re.search(r"mc-tiny: champion v1 acc_avg=0.5 .*eval/acc_avg=0.5", out), out
    code, out, _ = _run(
        capsys,
        "chat",
        saved["image"],
        "--model",
        saved["llava"],
        "--compressor",
        "models:/mc-tiny@champion",
        "-q",
        QUESTIONS[0],
    )
    assert code == 0 and "tokens kept 16/64" in out
    code, _, err = _run(
        capsys,
        "chat",
        saved["image"],
        "--model",
        saved["llava"],
        "--compressor",
        "models:/nope@champion",
        "-q",
        "hi ?",
    )
    assert code == 2 and "models:/nope@champion" in err
    shutil.rmtree(tmp_path / "ckpt")
