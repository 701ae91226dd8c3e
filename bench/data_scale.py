"""Peak memory of building and loading MT-GQA as the data grows (docs/benchmarks.md, "Data at
scale").

Usage::

    python -m bench.data_scale                       # 5k, 10k and 20k dialogues
    python -m bench.data_scale --sizes 30 60 --rows 30 --out /tmp/res   # the tests' size

For each size it writes a GQA-format set into a temporary folder (a questions JSON in the
release schema, ``{question_id: record}`` with the release's fields, and one JPEG per image on
disk, 320x240 .. 640x480), then runs two fresh subprocesses and records each one's peak resident
set:

- ``prepare``: ``mc_core.data.gqa.build`` + ``mc_core.data.schema.save``, what ``tasks.prepare``
  does for a ``source: gqa`` split;
- ``loading``: what training does to its data: ``schema.load`` (validates every row), then the
  training loop's order (a seeded permutation, batches of 36 dialogues), rows read through
  ``mc_core.training.targets.dataset_rows`` and every image decoded to RGB. One pass over the
  first ``--rows`` (2,000) rows of that order: the per-step work is the same for any size, so
  a fixed count keeps the bench short (a whole 20k pass adds minutes of JPEG decoding) and
  what could grow with the size is what ``load`` and the order hold, not what one batch does.

Peak RSS is the kernel's: ``VmHWM`` of ``/proc/self/status``, which each child reads as its
last step (the peak of its own address space since exec). Not ``ru_maxrss``: Linux carries the
resident set of the process that forked over into a child's ``ru_maxrss`` (and
``RUSAGE_CHILDREN`` gives the largest child), so a child of a parent holding torch would read as
large as the parent. Beside it, ``/proc/<pid>/status`` sampled every 20 ms gives the peaks of the
anonymous and the file-backed parts (the Arrow files are memory-mapped; pages of them the
process touches count in its RSS while mapped, though the kernel can drop them at any time).

Writes ``<out>/data-scale-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

SIZES = (5_000, 10_000, 20_000)
LOAD_ROWS = 2_000  # rows of the training order read by the loading child
MAX_RATIO = 1.2  # issue 26: peak RSS at the largest size within 20% of the smallest
BATCH = 36  # params.yaml: train.batch_size, the loop's dialogues per step
SEED = 0
# Questions per image and their weights: ~3 plus leftovers (4 and 5 leave one or two out, 2
# gives no dialogue), as in GQA where an image's last k mod 3 questions are dropped.
QUESTIONS_PER_IMAGE = {2: 5, 3: 45, 4: 25, 5: 15, 6: 10}
_STRUCTURAL = ("verify", "query", "choose", "logical", "compare")
_SEMANTIC = ("attr", "rel", "obj", "cat", "global")
_OBJECTS = ("cup", "plate", "table", "man", "dog", "car", "tree", "sign", "shirt", "window")
_COLOURS = ("red", "blue", "white", "black", "green", "brown", "yellow", "grey")


# ---------------------------------------------------------------------------------------------
# The GQA-format set


def _image_id(i: int) -> str:
    # GQA mixes Visual Genome's numeric ids with "n<digits>" ones; both sort by id_sort_key.
    return f"n{100_000 + i}" if i % 10 == 9 else str(2_300_000 + i)


def _question_id(i: int, j: int) -> str:
    # An odd multiplier not divisible by 5 is a bijection modulo 10**9: unique ids, scattered
    # over images, zero-padded to 8 digits like the release's ("02930152"); numeric order and
    # string order differ for them.
    return f"{((i * 8 + j) * 2_654_435_761) % 10**9:08d}"


def _record(rng: random.Random, image_id: str, qid: str, siblings: list[str]) -> dict:
    """One question in the release schema (about 1 KB of JSON, as train-balanced's average)."""
    obj, colour = rng.choice(_OBJECTS), rng.choice(_COLOURS)
    oid = str(rng.randrange(100_000, 4_000_000))
    structural = rng.choice(_STRUCTURAL)
    answer = rng.choice(("yes", "no", colour, obj))
    return {
        "semantic": [
            {"operation": "select", "dependencies": [], "argument": f"{obj} ({oid})"},
            {"operation": "filter color", "dependencies": [0], "argument": colour},
            {"operation": "exist", "dependencies": [1], "argument": "?"},
        ],
        "entailed": [s for s in siblings if s != qid][:4],
        "equivalent": [qid],
        "question": f"Is the {obj} on the left side {colour} or {rng.choice(_COLOURS)}?",
        "imageId": image_id,
        "isBalanced": True,
        "groups": {"global": None, "local": f"10q-{obj}_{colour}"},
        "answer": answer,
        "semanticStr": f"select: {obj} ({oid})->filter color: {colour} [0]->exist: ? [1]",
        "annotations": {
            "answer": {},
            "question": {"2": oid},
            "fullAnswer": {"1": oid},
        },
        "types": {
            "detailed": f"{rng.choice(_SEMANTIC)}{structural.capitalize()}",
            "semantic": rng.choice(_SEMANTIC),
            "structural": structural,
        },
        "fullAnswer": f"The {obj} is {colour}.",
    }


def _question_counts(dialogues: int, seed: int) -> list[int]:
    """Questions per image, image by image, until exactly ``dialogues`` dialogues (the last
    image is capped so the total is exact); image i's count depends on (seed, i) only, so a
    smaller set's images are a prefix of a larger one's."""
    counts, total = [], 0
    ks, weights = list(QUESTIONS_PER_IMAGE), list(QUESTIONS_PER_IMAGE.values())
    while total < dialogues:
        k = random.Random(f"{seed}-{len(counts)}").choices(ks, weights)[0]
        k = min(k, 3 * (dialogues - total) + 2)
        counts.append(k)
        total += k // 3
    return counts


def write_images(folder: Path, count: int, seed: int) -> None:
    """``<imageId>.jpg`` for images 0..count-1 (kept if present): smooth colour fields with
    noise, 320x240 .. 640x480, about 40 KiB each at JPEG quality 85."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{_image_id(i)}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        small = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int16)
        noisy = base + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=85)


def write_gqa_set(root: Path, dialogues: int, *, seed: int = SEED, images: Path) -> dict:
    """Writes ``root/questions.json`` (GQA release schema, one line, questions in scattered id
    order) for exactly ``dialogues`` dialogues, and their images into ``images``.

    Returns:
        ``{"dialogues", "questions", "images", "images_with_dialogues", "questions_json_mib",
        "images_mib"}``.
    """
    counts = _question_counts(dialogues, seed)
    write_images(images, len(counts), seed)
    qids = [(i, j) for i, k in enumerate(counts) for j in range(k)]
    random.Random(seed).shuffle(qids)  # the release is not grouped by image
    root.mkdir(parents=True, exist_ok=True)
    path = root / "questions.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        for n, (i, j) in enumerate(qids):
            siblings = [_question_id(i, s) for s in range(counts[i])]
            rec = _record(random.Random(f"{seed}-{i}-{j}"), _image_id(i), siblings[j], siblings)
            f.write(("," if n else "") + json.dumps(siblings[j]) + ": " + json.dumps(rec))
        f.write("}")
    files = [images / f"{_image_id(i)}.jpg" for i in range(len(counts))]
    return {
        "dialogues": dialogues,
        "questions": len(qids),
        "images": len(counts),
        "images_with_dialogues": sum(k >= 3 for k in counts),
        "questions_json_mib": round(path.stat().st_size / 2**20, 2),
        "images_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
    }


# ---------------------------------------------------------------------------------------------
# The measured children (run as ``python -m bench.data_scale --child ...``)


def _status_mib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of /proc/<pid>/status in MiB ({} off Linux or once the
    process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        return {}
    return out


def child_prepare(questions: str, images: str, out: str, cache: str) -> dict:
    """What ``tasks.prepare`` does for a ``source: gqa`` split: build (which checks every input
    and image), save, count the images."""
    from mc_core.data import gqa, schema

    imports = _status_mib().get("VmRSS")
    ds = gqa.build(questions, images, cache_dir=cache)
    schema.save(ds, out)
    return {
        "rows": len(ds),
        "images": len(set(ds["image_id"])),
        "rss_after_imports_mib": imports,
    }


def child_loading(path: str, rows: int, batch: int, seed: int) -> dict:
    """What training does to its data: ``schema.load`` (validates), the loop's order, rows in
    batches through ``dataset_rows``, images decoded to RGB."""
    import torch

    from mc_core.data import schema
    from mc_core.data.images import to_rgb
    from mc_core.training.targets import dataset_rows

    torch.set_num_threads(1)
    imports = _status_mib().get("VmRSS")
    ds = schema.load(path)
    # As mc_core.training.loop._order: a permutation seeded by (seed, epoch); epoch 0.
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 100_003))
    order = order[: min(rows, len(ds))].tolist()
    pixels = 0
    for start in range(0, len(order), batch):
        for r in dataset_rows(ds, order[start : start + batch]):
            image = to_rgb(r["image"])
            image.load()
            pixels += image.size[0] * image.size[1]
    return {"rows": len(order), "pixels": pixels, "rss_after_imports_mib": imports}


def _child(argv: list[str]) -> int:
    kind, result, *args = argv
    if kind == "prepare":
        out = child_prepare(*args)
    else:
        path, rows, batch, seed = args
        out = child_loading(path, int(rows), int(batch), int(seed))
    peak = _status_mib().get("VmHWM")
    if peak is None:  # not Linux: the process' own peak, pre-exec hiwater included
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_rss_mib"] = round(peak, 1)
    out["rss_after_imports_mib"] = round(out["rss_after_imports_mib"] or float("nan"), 1)
    Path(result).write_text(json.dumps(out))
    return 0


def measure(args: list[str], workdir: Path, sample_s: float = 0.02) -> dict:
    """Runs ``python -m bench.data_scale --child <args>`` in a fresh process; its result (with
    its own peak RSS), sampled peaks of RssAnon / RssFile and the wall time.

    Raises:
        RuntimeError: the child failed (the tail of its output quoted).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / f"{args[0]}-result.json"
    log = workdir / f"{args[0]}.log"
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench.data_scale", "--child", args[0], str(result), *args[1:]]
    peaks: dict[str, float] = {}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            for key, value in _status_mib(proc.pid).items():
                peaks[key] = max(peaks.get(key, 0.0), value)
            time.sleep(sample_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return {
        **json.loads(result.read_text()),
        "peak_rss_anon_mib_sampled": round(peaks.get("RssAnon", float("nan")), 1),
        "peak_rss_file_mib_sampled": round(peaks.get("RssFile", float("nan")), 1),
        "wall_s": round(wall, 2),
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(sizes: list[int], *, rows: int = LOAD_ROWS, seed: int = SEED, tmp: Path) -> dict:
    """Measures every size in ``tmp`` (module docstring); returns the result document.

    Raises:
        RuntimeError: a child failed, or built another number of dialogues than asked.
    """
    images = tmp / "images"  # shared: a smaller set's images are a prefix of a larger one's
    cases = []
    for n in sorted(set(sizes)):
        root = tmp / f"gqa-{n}"
        case = write_gqa_set(root, n, seed=seed, images=images)
        out, cache = root / "data-train", root / "cache"
        prepare = measure(
            ["prepare", str(root / "questions.json"), str(images), str(out), str(cache)],
            root / "logs",
        )
        if prepare["rows"] != n or prepare["images"] != case["images_with_dialogues"]:
            raise RuntimeError(f"{n} dialogues asked, prepare built {prepare}")
        case["dataset_mib"] = round(_size(out) / 2**20, 1)
        loading = measure(["loading", str(out), str(rows), str(BATCH), str(seed)], root / "logs")
        cases.append({**case, "prepare": prepare, "loading": loading})
        shutil.rmtree(root)  # the disk holds one size's outputs at a time (and the images)
    first, last = cases[0], cases[-1]
    ratio = {
        kind: round(last[kind]["peak_rss_mib"] / first[kind]["peak_rss_mib"], 3)
        for kind in ("prepare", "loading")
    }
    return {
        "benchmark": "data-scale",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "peak_rss": "VmHWM of /proc/self/status, read by each child as its last step: the "
        "kernel's peak resident set of the child's own address space, anonymous and "
        "file-backed pages together (not ru_maxrss: Linux carries the parent's resident set "
        "at fork/exec over into a child's ru_maxrss)",
        "peak_rss_sampled": "RssAnon / RssFile peaks of /proc/<pid>/status sampled every 20 ms "
        "(a breakdown; may miss short peaks)",
        "prepare": "mc_core.data.gqa.build + mc_core.data.schema.save (tasks.prepare for a "
        "source: gqa split)",
        "loading": f"schema.load, then the first {rows} rows of the training loop's order in "
        f"batches of {BATCH} through mc_core.training.targets.dataset_rows, images to RGB",
        "settings": {
            "load_rows": rows,
            "batch": BATCH,
            "seed": seed,
            "questions_per_image_weights": QUESTIONS_PER_IMAGE,
            "images": "JPEG quality 85, 320x240 .. 640x480, one per image id",
        },
        "sizes": cases,
        "ratio_largest_to_smallest": {"dialogues": [first["dialogues"], last["dialogues"]]} | ratio,
        "criterion": {"max_ratio": MAX_RATIO, "met": all(r <= MAX_RATIO for r in ratio.values())},
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.data_scale",
        description="Peak RSS of building (prepare) and loading (training) MT-GQA at growing "
        "sizes of a generated GQA-format set.",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="dialogues")
    p.add_argument("--rows", type=int, default=LOAD_ROWS, help="rows the loading child reads")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default="bench/results", help="folder of the result JSON")
    p.add_argument("--machine", default=None, help="label in the file name (default cpu-<n>c)")
    p.add_argument("--tmp", default=None, help="where the temporary sets go (default: $TMPDIR)")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.rows < 1:
        p.error(f"--sizes {args.sizes} and --rows {args.rows} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--child``, one measured child) and writes the JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    args = parse_args(argv)
    # bench.machine imports torch: only the parent pays for it, never a measured child.
    import torch

    from bench.machine import describe_machine, machine_slug
    from mc_core.io import write_json

    cpu = torch.device("cpu")
    machine = describe_machine(cpu)
    tmp = Path(tempfile.mkdtemp(prefix="data-scale-", dir=args.tmp))
    try:
        result = run(args.sizes, rows=args.rows, seed=args.seed, tmp=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"] = machine
    result["command"] = "python -m bench.data_scale " + " ".join(argv)
    day = result["created"][:10]
    path = write_json(
        Path(args.out) / f"data-scale-{args.machine or machine_slug(cpu)}-{day}.json", result
    )
    for case in result["sizes"]:
        print(
            f"{case['dialogues']:>7} dialogues: prepare {case['prepare']['peak_rss_mib']:.0f} MiB "
            f"({case['prepare']['wall_s']:.0f} s), loading {case['loading']['peak_rss_mib']:.0f} "
            f"MiB ({case['loading']['wall_s']:.0f} s)"
        )
    r = result["ratio_largest_to_smallest"]
    print(
        f"largest / smallest: prepare {r['prepare']:.3f}, loading {r['loading']:.3f} "
        f"(criterion <= {MAX_RATIO}: {'met' if result['criterion']['met'] else 'NOT met'}); {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
