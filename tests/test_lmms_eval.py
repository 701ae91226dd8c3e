"""mc_lmms: the lmms-eval plugin and the multi-turn task generator.

The unit tests run in the main venv (lmms-eval is not imported). The parity tests run lmms-eval
0.7.3 itself, offline, in its own venv (`make lmms-env` builds `.venv-lmms`; they skip with the
reason when it is absent): on a tiny random LLaVA saved with `zoo.save`, a task generated from
a small synthetic dialogue set and a multiple-choice task on the same images, for `none`,
`sample` and a metacompress checkpoint registered as champion in a temporary MLflow store
(`compressor=models:/...@champion`). lmms-eval's per-turn answers must equal the project's own
`Conversation`, its per-turn accuracies the project's `evaluate()`, its reported prompt tokens
the conversation's compressed prompt, and its loglikelihood losses the conversation's
first-token log-probabilities. lmms-eval's CLI exits 0 when evaluation raises, so every run is
also checked for logged errors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import datasets
import pytest
import torch

from mc_core.compressors import build
from mc_core.compressors.checkpoint import load_compressor, save_compressor
from mc_core.data import schema, synthetic
from mc_core.evaluation import runner as meval
from mc_core.inference.conversation import Conversation
from mc_core.models import zoo
from mc_lmms import compare, loading, task_utils
from mc_lmms.tasks import write_task

ROOT = Path(__file__).resolve().parents[1]
LMMS_VENV = Path(os.environ.get("MC_LMMS_VENV", ROOT / ".venv-lmms"))
RATE = 0.9
MAX_NEW = 4
DIALOGUES = 4
REGISTERED = "metacompress-lmms-parity-r0.9"
SPEC = zoo.TINY["tiny-llava"].with_sizes(
    text_hidden=64, text_intermediate=128, vision_hidden=32, vision_intermediate=64, vision_heads=2
)


def _lmms_missing() -> str | None:
    if not (LMMS_VENV / ".installed").is_file():
        return (
            f"lmms-eval venv {LMMS_VENV} is not built: `make lmms-env` builds it "
            "(.ci/run does when its time guard allows)"
        )
    return None


needs_lmms = pytest.mark.skipif(_lmms_missing() is not None, reason=str(_lmms_missing()))


# -- unit tests (main venv) -----------------------------------------------------------------


def test_doc_to_text_walks_the_turns_then_stops():
    doc = {"questions": ["q1 ?", "q2 ?", "q3 ?"]}
    assert task_utils.doc_to_text(doc) == "q1 ?"
    assert task_utils.doc_to_text(doc, None, previous_output=["a"], round_idx=1) == (
        None,
        "q2 ?",
        False,
        ["a"],
        None,
    )
    assert task_utils.doc_to_text(doc, round_idx=2, previous_output=["a", "b"])[1] == "q3 ?"
    assert task_utils.doc_to_text(doc, round_idx=3, previous_output=["a", "b", "c"])[2] is True


def test_process_results_uses_the_evaluators_metric():
    doc = {"dialogue_id": "d0", "answer_sets": [["red"], ["2"], ["yes"] * 2 + ["no"] * 8]}
    out = task_utils.process_results(doc, [["Red.", "two", "yes"]])
    # exact match after VQA normalisation; 2 of 10 humans agreeing -> soft accuracy 0.6
    assert out == {
        "acc_turn_1": 1.0,
        "acc_turn_2": 1.0,
        "acc_turn_3": pytest.approx(0.6),
        "acc_avg": pytest.approx(2.6 / 3),
    }
    with pytest.raises(ValueError, match="d0.*2 answers for 3 turns"):
        task_utils.process_results(doc, [["red", "2"]])


@pytest.fixture(scope="module")
def tiny_llava(one_thread):
    return zoo.build(SPEC)


def test_resolve_compressor_errors_name_the_value(tiny_llava, tmp_path):
    model, _ = tiny_llava
    assert loading.resolve_compressor("none", rate=None, model=model) is None
    sample = loading.resolve_compressor("sample", rate=0.75, model=model)
    assert (sample.name, sample.rate) == ("sample", 0.75)
    with pytest.raises(ValueError, match="'bogus' is not a method"):
        loading.resolve_compressor("bogus", rate=0.9, model=model)
    with pytest.raises(ValueError, match="'sample' needs rate="):
        loading.resolve_compressor("sample", rate=None, model=model)
    with pytest.raises(ValueError, match="'metacompress' must be trained"):
        loading.resolve_compressor("metacompress", rate=0.9, model=model)
    with pytest.raises(ValueError, match="model_args rate.*1.5"):
        loading.parse_rate("1.5")
    ckpt = save_compressor(
        tmp_path / "c", build("metacompress", rate=0.9, dim=64), meta={"family": "qwen2_vl"}
    )
    with pytest.raises(ValueError, match="family"):
        loading.resolve_compressor(str(ckpt), rate=0.9, model=model)
    ckpt = save_compressor(
        tmp_path / "c", build("metacompress", rate=0.9, dim=64), meta={"family": "llava"}
    )
    assert loading.resolve_compressor(str(ckpt), rate=None, model=model).rate == 0.9
    with pytest.raises(ValueError, match="trained for rate 0.9, but rate=0.5"):
        loading.resolve_compressor(str(ckpt), rate=0.5, model=model)


def test_write_task_checks_its_input(tmp_path):
    ds = synthetic.generate(2, seed=0)
    schema.save(ds, tmp_path / "data")
    out = write_task(tmp_path / "data", tmp_path / "task")
    assert sorted(p.name for p in out.iterdir()) == [
        "mt_synthetic.parquet",
        "mt_synthetic.yaml",
        "utils.py",
    ]
    text = (out / "mt_synthetic.yaml").read_text()
    assert "output_type: generate_until_multi_round" in text
    assert f'test: "{out / "mt_synthetic.parquet"}"' in text
    back = datasets.load_dataset(
        "parquet",
        data_files=str(out / "mt_synthetic.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert back["questions"] == ds["questions"] and back[0]["image"].size == ds[0]["image"].size
    with pytest.raises(ValueError, match="task name 'a b'"):
        write_task(tmp_path / "data", tmp_path / "t2", name="a b")
    with pytest.raises(ValueError, match="limit=0"):
        write_task(tmp_path / "data", tmp_path / "t2", limit=0)
    with pytest.raises(ValueError, match=str(tmp_path / "nope")):
        write_task(tmp_path / "nope", tmp_path / "t2")


def test_compare_puts_turns_side_by_side(tmp_path, capsys):
    out = tmp_path / "runs" / "model"
    out.mkdir(parents=True)
    res = {
        "results": {
            "mt_x": {"acc_turn_1,none": 0.5, "acc_turn_2,none": 0.25, "acc_avg,none": 0.375}
        }
    }
    (out / "20260101_results.json").write_text(json.dumps(res))
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"methods": {"m": {"acc_turn": [0.5, 0.25]}}}))
    assert (
        compare.main([str(tmp_path / "runs"), str(report), "--task", "mt_x", "--method", "m"]) == 0
    )
    assert "agree" in capsys.readouterr().out
    report.write_text(json.dumps({"methods": {"m": {"acc_turn": [0.5, 0.3]}}}))
    assert (
        compare.main([str(tmp_path / "runs"), str(report), "--task", "mt_x", "--method", "m"]) == 1
    )
    with pytest.raises(ValueError, match="no method 'z'"):
        compare.compare(tmp_path / "runs", report, task="mt_x", method="z")
    with pytest.raises(ValueError, match="no lmms-eval .*'mt_y'"):
        compare.compare(tmp_path / "runs", report, task="mt_y", method="m")


# -- parity with lmms-eval (its own venv) --------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR = re.compile(r"\|\s*(ERROR|CRITICAL)\s*\||Traceback \(most recent call last\)")


def run_lmms(
    world: dict, compressor: str, out: Path, *, tasks: str = "mc_parity,mc_single,mc_choice"
):
    """lmms-eval's CLI in its venv, offline; returns (results, {task: samples by doc_id}).

    Raises AssertionError when it fails, logs an error (its CLI exits 0 then) or writes no
    results."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(world["root"] / "hf"),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": world["uri"],
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = f"pretrained={world['model']},compressor={compressor},rate={RATE}"
    cmd = [
        str(LMMS_VENV / "bin" / "python"),
        "-m",
        "lmms_eval",
        "--model",
        "metacompress",
        "--model_args",
        args,
        "--tasks",
        tasks,
        "--include_path",
        str(world["tasks"]),
        "--output_path",
        str(out),
        "--log_samples",
        "--batch_size",
        "1",
    ]
    # A hang guard only: a run takes about 10 s.
    proc = subprocess.run(
        cmd, cwd=world["root"], env=env, capture_output=True, text=True, timeout=600
    )
    log = _ANSI.sub("", proc.stdout + proc.stderr)
    errors = [line for line in log.splitlines() if _ERROR.search(line)]
    assert proc.returncode == 0 and not errors, (
        f"lmms-eval (rc={proc.returncode}) reported errors: {errors[:3]}\n{log[-3000:]}"
    )
    found = sorted(out.rglob("*_results.json"))
    assert found, f"lmms-eval wrote no results under {out}\n{log[-3000:]}"
    samples = {}
    for task in tasks.split(","):
        files = sorted(out.rglob(f"*_samples_{task}.jsonl"))
        assert files, f"no samples for {task} under {out}"
        rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
        samples[task] = {r["doc_id"]: r for r in rows}
    return json.loads(found[-1].read_text()), samples


_TURN1_UTILS = """from mc_core.evaluation.scoring import score_answer
from mc_lmms.task_utils import doc_to_visual

CHOICES = {choices!r}


def doc_to_text(doc):
    return doc["questions"][0]


def doc_to_choice(doc):
    return CHOICES


def doc_to_target(doc):
    return CHOICES.index(doc["answers"][0])


def single_target(doc):
    return doc["answers"][0]


def process_single(doc, results):
    return {{"acc": score_answer(results[0], doc["answer_sets"][0])}}
"""

_TURN1_YAML = """task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _turn1_tasks(ds: datasets.Dataset, folder: Path) -> list[str]:
    """Two single-turn tasks on turn 1: `mc_single` (generate_until, one question) and
    `mc_choice` (multiple choice, loglikelihood requests; the choices are single words)."""
    choices = sorted({a[0] for a in ds["answers"]} | {"yes", "no"})
    folder.mkdir(parents=True)
    parquet = folder / "turn1.parquet"
    ds.to_parquet(str(parquet))
    (folder / "utils.py").write_text(_TURN1_UTILS.format(choices=choices))
    (folder / "mc_choice.yaml").write_text(
        _TURN1_YAML.format(
            task="mc_choice",
            parquet=json.dumps(str(parquet)),
            output_type="multiple_choice",
            extra="doc_to_choice: !function utils.doc_to_choice\n"
            "doc_to_target: !function utils.doc_to_target\n",
        )
    )
    (folder / "mc_single.yaml").write_text(
        _TURN1_YAML.format(
            task="mc_single",
            parquet=json.dumps(str(parquet)),
            output_type="generate_until",
            extra="doc_to_target: !function utils.single_target\n"
            "process_results: !function utils.process_single\n"
            f"generation_kwargs:\n  max_new_tokens: {MAX_NEW}\n",
        )
    )
    return choices


def _dialogues(model, processor, ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` with gold answers partly replaced by the random model's own answers, so
    accuracies are neither all 0 nor all 1; the last dialogue becomes VQAv2-like (ten human
    answers, soft accuracy)."""
    rows = ds.to_list()  # images stay encoded here; ds[i] decodes them
    for i, row in enumerate(rows):
        conv = Conversation(model, processor, None, images=[ds[i]["image"]], max_new_tokens=MAX_NEW)
        own = [conv.ask(q) for q in row["questions"]]
        answers = [own[k] if (i + k) % 2 == 0 else a for k, a in enumerate(row["answers"])]
        row["answers"] = answers
        if i == len(rows) - 1:
            row["source"] = "vqav2"
            row["answer_sets"] = [[a] * 2 + ["nothing"] * 8 for a in answers]
        else:
            row["answer_sets"] = [[a] for a in answers]
    return datasets.Dataset.from_list(rows, features=ds.features)


def _register(root: Path, ckpt: Path) -> str:
    import mc_registry
    from tasks import tracking

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mc_registry.migrate(uri)
    run = tracking.start_cell_run("lmms-parity", "tiny-llava", "0.9", params={}, uri=uri)
    tracking.register_checkpoint(REGISTERED, ckpt, run_id=run, score=0.5, metric="acc_avg", uri=uri)
    return uri


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """Saved tiny model, registered metacompress checkpoint, tasks, and the project's own
    answers (Conversation) and accuracies (evaluate) for every method."""
    if _lmms_missing():
        pytest.skip(_lmms_missing())
    root = tmp_path_factory.mktemp("lmms")
    built, processor = zoo.build(SPEC)
    zoo.save(built, processor, root / "model")
    model, processor = zoo.load(root / "model")  # what the plugin loads
    with torch.random.fork_rng(devices=[]):
        # Untrained but deterministic: parity needs the same weights on both sides, not skill.
        torch.manual_seed(0)
        comp = build("metacompress", rate=RATE, dim=SPEC.text_hidden)
    save_compressor(root / "ckpt", comp, meta={"family": "llava"})
    uri = _register(root, root / "ckpt")
    original = synthetic.generate(DIALOGUES, seed=3)
    ds = _dialogues(model, processor, original)
    schema.save(ds, root / "data")
    write_task(
        root / "data", root / "tasks" / "mc_parity", name="mc_parity", max_new_tokens=MAX_NEW
    )
    choices = _turn1_tasks(original, root / "tasks" / "turn1")  # one-word answers
    comps = {
        "none": None,
        "sample": build("sample", rate=RATE, dim=SPEC.text_hidden),
        "metacompress": load_compressor(root / "ckpt"),
    }
    convs = {}
    for name, c in comps.items():
        convs[name] = []
        for row in ds:
            conv = Conversation(model, processor, c, images=[row["image"]], max_new_tokens=MAX_NEW)
            for q in row["questions"]:
                conv.ask(q)
            convs[name].append(conv)
    report = meval.evaluate(
        model,
        processor,
        ds,
        list(comps),
        RATE,
        compressors={"metacompress": comps["metacompress"]},
        device="cpu",
        max_new_tokens=MAX_NEW,
        progress=False,
    )
    return {
        "root": root,
        "model": root / "model",
        "tasks": root / "tasks",
        "uri": uri,
        "ds": ds,
        "choices": choices,
        "convs": convs,
        "report": report,
        "tokenizer": processor.tokenizer,
    }


METHODS = {"none": "none", "sample": "sample", "metacompress": f"models:/{REGISTERED}@champion"}


@needs_lmms
def test_fixture_dataset_is_not_trivial(world):
    # Some turns right, some wrong: the accuracy comparison below can fail.
    acc = world["report"]["methods"]["none"]["acc_turn"]
    assert 0 < sum(acc) / len(acc) < 1


@needs_lmms
@pytest.mark.parametrize("method", list(METHODS))
def test_lmms_eval_matches_conversation_and_evaluator(world, method, tmp_path):
    results, samples = run_lmms(world, METHODS[method], tmp_path / "out")
    convs = world["convs"][method]
    dialogue = samples["mc_parity"]
    assert sorted(dialogue) == list(range(DIALOGUES))
    for i, conv in enumerate(convs):
        assert dialogue[i]["filtered_resps"] == conv.answers, f"dialogue {i}"
        # prompt tokens after compression: the whole compressed dialogue the model read
        assert dialogue[i]["token_counts"] == [{"input_tokens": conv.cache_tokens[-1]}]
    mine = world["report"]["methods"][method]
    report = tmp_path / "eval.json"
    report.write_text(json.dumps(world["report"]))
    got, want = compare.compare(tmp_path / "out", report, task="mc_parity", method=method)
    # Same scores summed in the same order: equal up to float rounding.
    assert len(got) == 3 and got == pytest.approx(want, abs=1e-12)
    assert results["results"]["mc_parity"]["acc_avg,none"] == pytest.approx(
        mine["acc_avg"], abs=1e-12
    )

    for i, conv in enumerate(convs):  # one question: turn 1 of the same conversation
        single = samples["mc_single"][i]
        assert single["filtered_resps"] == conv.answers[0], f"dialogue {i}"
        assert single["token_counts"] == [{"input_tokens": conv.cache_tokens[0]}]

    tok = world["tokenizer"]
    ids = [tok.convert_tokens_to_ids(c) for c in world["choices"]]
    hits = []
    for i, conv in enumerate(convs):
        logp = torch.log_softmax(conv.first_logits[0], dim=-1)
        sample = samples["mc_choice"][i]
        # [(loss, greedy)] as text; one-token choices: loss = -log p(choice)
        got_lp = [-float(r[0]) for r in sample["filtered_resps"]]
        want = [float(logp[j]) for j in ids]
        # One full forward (lmms-eval) vs a cached prefill (Conversation): float32 sums in
        # another order, so log-probabilities agree to ~1e-5, not bit for bit.
        assert got_lp == pytest.approx(want, abs=1e-4), f"dialogue {i}"
        assert [r[1] == "True" for r in sample["filtered_resps"]] == [
            j == int(logp.argmax()) for j in ids
        ]
        # the choice prompt is turn 1's: same compressed prompt length
        assert sample["token_counts"][0] == {"input_tokens": conv.cache_tokens[0]}
        hits.append(float(max(range(len(ids)), key=want.__getitem__) == int(sample["target"])))
    assert results["results"]["mc_choice"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


@needs_lmms
def test_logged_error_with_exit_status_0_fails(world, tmp_path):
    # An untrained metacompress is refused when the model is built; lmms-eval logs the error
    # and exits 0 anyway: run_lmms must not accept that run.
    with pytest.raises(AssertionError, match="must be trained"):
        run_lmms(world, "metacompress", tmp_path / "out", tasks="mc_parity")
