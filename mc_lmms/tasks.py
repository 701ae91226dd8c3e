"""Write an lmms-eval task folder from a dialogue dataset (MT-GQA, MT-VQA-v2, synthetic...).

The folder holds ``<name>.yaml`` (``output_type: generate_until_multi_round``), ``utils.py``
(the callbacks of ``mc_lmms.task_utils``) and ``<name>.parquet`` (the dialogues, images
embedded), so lmms-eval runs it offline with ``--include_path <folder> --tasks <name>``.
One document is one dialogue; each turn is scored like the project's evaluator does
(``acc_turn_<k>``, ``acc_avg``), with the model's own earlier answers as history (the
evaluator's default ``history: model``).

The YAML names the parquet file by its absolute path (lmms-eval resolves ``data_files``
against the working directory): regenerate the folder after moving it.

Usage::

    python -m mc_lmms.tasks data/test lmms_tasks/mt_gqa            # name from the source: mt_gqa
    python -m mc_lmms.tasks data/vqav2-test lmms_tasks/mt_vqav2 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mc_core import io
from mc_core.data import schema
from mc_lmms.task_utils import metric_names

__all__ = ["default_name", "main", "write_task"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_UTILS = '''"""Callbacks of this generated task: see mc_lmms.task_utils."""

from mc_lmms.task_utils import doc_to_text, doc_to_visual, process_results

__all__ = ["doc_to_text", "doc_to_visual", "process_results"]
'''


def default_name(dataset) -> str:
    """``mt_<source>`` of the dataset's first dialogue (``mt_gqa``, ``mt_vqav2``...)."""
    return f"mt_{dataset[0]['source']}"


def _yaml(name: str, parquet: Path, *, turns: int, max_new_tokens: int, meta: dict) -> str:
    # Written by hand: `!function` tags are lmms-eval's YAML extension. Strings go through
    # json.dumps, which is valid YAML quoting for any path.
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
        for m in metric_names(turns)
    )
    meta_lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in meta.items())
    return (
        f"task: {name}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(parquet))}\n"
        "test_split: test\n"
        "output_type: generate_until_multi_round\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answers\n"
        "process_results: !function utils.process_results\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n"
        "  do_sample: false\n"
        "  temperature: 0\n"
        f"metric_list:\n{metrics}"
        f"metadata:\n  version: 1\n{meta_lines}"
    )


def write_task(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    max_new_tokens: int = 4,
    limit: int | None = None,
) -> Path:
    """Write the task folder ``out_dir`` (replaced atomically) from the dataset ``data_dir``.

    Args:
        data_dir: a dialogue dataset folder (``mc_core.data.schema``, e.g. the prepare
            stage's ``data/test``).
        out_dir: the task folder to write.
        name: the lmms-eval task name (default ``mt_<source>``).
        max_new_tokens: answer length limit per turn (the evaluator's default is 4).
        limit: keep only the first N dialogues.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the dataset breaks the schema (naming the column and row), a bad name,
            limit or max_new_tokens.
    """
    dataset = schema.load(data_dir)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit={limit!r}: expected a positive int")
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the dataset has no dialogues")
    name = name or default_name(dataset)
    if not _NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}: use letters, digits, '_' or '-', letter first")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")
    out = Path(out_dir).resolve()
    turns = len(dataset[0]["questions"])
    meta = {
        "data": str(Path(data_dir).resolve()),
        "dialogues": len(dataset),
        "turns": turns,
        "history": "model",
    }
    with io.staged_dir(out) as tmp:
        dataset.to_parquet(str(tmp / f"{name}.parquet"))
        (tmp / "utils.py").write_text(_UTILS)
        (tmp / f"{name}.yaml").write_text(
            _yaml(
                name, out / f"{name}.parquet", turns=turns, max_new_tokens=max_new_tokens, meta=meta
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m mc_lmms.tasks DATA OUT [--name N] [--max-new-tokens K] [--limit L]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="dialogue dataset folder (e.g. data/test)")
    ap.add_argument("out", help="task folder to write (pass it to --include_path)")
    ap.add_argument("--name", help="task name (default mt_<source>)")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="first N dialogues only")
    a = ap.parse_args(argv)
    out = write_task(a.data, a.out, name=a.name, max_new_tokens=a.max_new_tokens, limit=a.limit)
    name = a.name or next(out.glob("*.yaml")).stem
    print(f"wrote {out}: lmms-eval --include_path {out} --tasks {name}")


if __name__ == "__main__":
    main()
