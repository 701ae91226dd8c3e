"""Bad data among good: odd and broken images, empty questions, unicode answers, no rows.

Data enters the pipeline through ``tasks.prepare``. Each trial writes a small benchmark in the
GQA file layout (a questions JSON, a folder of ``<imageId>.jpg``: four images, three questions
each, so four dialogues) with one odd item among good ones, points ``data.train``, ``data.val``
and ``data.test`` at it (``MC_PARAMS``: a params file outside the workspace) and runs
``tasks.prepare``, then ``tasks.train`` and ``tasks.evaluate`` of one cell, by hand in a clone.

Decisions (docs/reliability.md):
- undecodable bytes (truncated, not an image), an empty question, a source with no dialogue:
  prepare stops with a clear error naming the file and the question ids (the builders decode
  every image once before writing anything), and every earlier output is intact. A saved
  dataset holding such bytes (written by something other than prepare) fails in train or
  evaluate with an error naming the row and its dialogue id (``mc_core.data.schema.row``).
- grey, RGBA, CMYK, 16-bit, palette, 1x1 and 8000x8000 images, unicode answers: valid data;
  every stage completes (images are converted to RGB and resized by the model's processor).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from reliability import workspace as W
from reliability.core import Context, Trial, fault

N_IMAGES = 4
ODD = "img1"  # the image (and dialogue) that carries the fault


def _png(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    colour = {
        "L": 128,
        "RGBA": (200, 30, 30, 128),
        "CMYK": (0, 200, 200, 0),
        "I;16": 40000,
        "P": 3,
        "RGB": (30, 160, 60),
    }[mode]
    im = Image.new(mode, size, colour)
    if mode == "P":
        im.putpalette([(i * 37) % 256 for i in range(768)])
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _source(
    root: Path,
    *,
    image: bytes | None = None,
    question: str | None = None,
    answer: str | None = None,
    empty: bool = False,
) -> tuple[Path, Path]:
    """A GQA-layout benchmark under ``root``: (questions file, images folder)."""
    imgs = root / "images"
    imgs.mkdir(parents=True)
    qs: dict[str, dict] = {}
    for i in range(N_IMAGES):
        iid = f"img{i}"
        data = image if (iid == ODD and image is not None) else _png("RGB", (32, 32), "JPEG")
        (imgs / f"{iid}.jpg").write_bytes(data)
        for t, (q, a) in enumerate(
            (
                ("is there a red circle ?", "yes"),
                ("what colour is the square ?", "blue"),
                ("how many objects are there ?", "2"),
            )
        ):
            if iid == ODD and t == 1:
                q = question if question is not None else q
                a = answer if answer is not None else a
            qs[f"{i}{t:02d}"] = {
                "imageId": iid,
                "question": q,
                "answer": a,
                "fullAnswer": a,
                "isBalanced": True,
                "types": {"structural": "query", "semantic": "attr", "detailed": "x"},
                "annotations": {},
            }
    f = root / "questions.json"
    f.write_text(json.dumps({} if empty else qs, ensure_ascii=False))
    return f, imgs


def _params(ws: Path, questions: Path, images: Path, dst: Path) -> Path:
    """The workspace's params with every split read from the benchmark, at ``dst``."""
    import yaml

    p = yaml.safe_load((ws / "params.yaml").read_text())
    split = {
        "source": "gqa",
        "questions": str(questions),
        "images": str(images),
        "dialogues": None,
        "seed": 0,
    }
    p["data"] = {"train": split, "val": dict(split, seed=1), "test": dict(split, seed=2)}
    dst.write_text(yaml.safe_dump(p, sort_keys=False, allow_unicode=True))
    return dst


def bad_input_trial(ctx: Context, tag: str, *, expect: str, **source) -> Trial:
    """Prepare, train and evaluate one cell on a benchmark with one odd item.

    ``expect``: ``"ok"`` (every stage completes) or the text the prepare error must contain
    besides the questions file or image path.
    """
    ref = ctx.reference()
    ws = ctx.clone(tag)
    questions, images = _source(ctx.scratch(f"{tag}-src"), **source)
    params = _params(ws, questions, images, ws.parent / f"{ws.name}.params.yaml")
    outs = W.all_outs(ref)
    want = W.snapshot(ws, outs)
    env = {"MC_PARAMS": str(params)}
    r = W.python(ws, "-m", "tasks.prepare", **env)
    out = (r.stdout or "") + (r.stderr or "")
    err = next((ln for ln in out.splitlines() if " error: " in ln), "").strip()
    if expect != "ok":
        named = str(questions) in err or str(images) in err
        clear = r.returncode != 0 and expect in err and named and "Traceback" not in out
        got = W.snapshot(ws, outs)
        lost = [p for p in outs if got[p] != want[p]]
        how = (
            f"prepare exit {r.returncode}: {err[:260]!r}; earlier outputs "
            f"{'intact' if not lost else f'CHANGED {lost}'}"
        )
        return Trial(clear and not lost, bool(lost), how)
    if r.returncode != 0:
        return Trial(False, False, f"prepare failed: {out.strip().splitlines()[-3:]}")
    counts = json.loads((ws / "reports" / "data.json").read_text())
    steps = []
    for module in ("tasks.train", "tasks.evaluate"):
        r = W.python(ws, "-m", module, "--arch", W.ARCH, "--rate", "0.5", **env)
        steps.append(f"{module.split('.')[1]} exit {r.returncode}")
        if r.returncode != 0:
            tail = " | ".join(((r.stdout or "") + (r.stderr or "")).strip().splitlines()[-3:])
            return Trial(False, False, f"{', '.join(steps)}: {tail[-500:]}")
    ev = json.loads((ws / "reports" / "eval" / f"{W.CELL}.json").read_text())
    how = (
        f"prepare kept {counts['train']['dialogues']}/{N_IMAGES} dialogues; "
        f"{', '.join(steps)}; evaluated {ev.get('n_dialogues')} dialogues "
        f"(metacompress acc_avg {ev['methods']['metacompress']['acc_avg']:.3f})"
    )
    return Trial(counts["train"]["dialogues"] == N_IMAGES, False, how)


def _image_fault(
    name: str, mode: str, size: tuple[int, int], fmt: str, doc: str, ci: bool = False
) -> None:
    def fn(ctx: Context, trial: int) -> Trial:
        return bad_input_trial(ctx, name, expect="ok", image=_png(mode, size, fmt))

    fn.__doc__ = doc
    fault(name, "bad-input", ci=ci)(fn)


_image_fault(
    "image-grey",
    "L",
    (40, 30),
    "PNG",
    "a greyscale (L) PNG among RGB JPEGs: converted, every stage completes",
)
_image_fault(
    "image-rgba",
    "RGBA",
    (40, 30),
    "PNG",
    "an RGBA PNG (alpha) among RGB JPEGs: converted, every stage completes",
    ci=True,
)
_image_fault(
    "image-cmyk",
    "CMYK",
    (40, 30),
    "JPEG",
    "a CMYK JPEG among RGB JPEGs: converted, every stage completes",
)
_image_fault(
    "image-16bit",
    "I;16",
    (40, 30),
    "PNG",
    "a 16-bit greyscale PNG among RGB JPEGs: converted, every stage completes",
)
_image_fault(
    "image-palette",
    "P",
    (40, 30),
    "PNG",
    "a palette (P) PNG among RGB JPEGs: converted, every stage completes",
)
_image_fault(
    "image-1x1",
    "RGB",
    (1, 1),
    "PNG",
    "a 1x1 image among 32x32 ones: resized by the processor, every stage completes",
)
_image_fault(
    "image-8000x8000",
    "RGB",
    (8000, 8000),
    "PNG",
    "an 8000x8000 image (64 Mpixel) among 32x32 ones: every stage completes",
)


@fault("image-truncated", "bad-input", ci=True)
def truncated(ctx: Context, trial: int) -> Trial:
    """a JPEG cut in half among good ones: prepare stops naming the image file and the
    question ids needing it, before writing anything"""
    good = _png("RGB", (64, 64), "JPEG")
    return bad_input_trial(
        ctx, "truncated", expect="unreadable image", image=good[: len(good) // 2]
    )


@fault("image-not-an-image", "bad-input")
def not_image(ctx: Context, trial: int) -> Trial:
    """text bytes saved as <id>.jpg among good images: prepare stops naming the file and the
    question ids, before writing anything"""
    return bad_input_trial(
        ctx, "not-image", expect="unreadable image", image=b"<html>404 Not Found</html>"
    )


@fault("empty-question", "bad-input")
def empty_question(ctx: Context, trial: int) -> Trial:
    """a blank question among good ones: prepare stops naming the file, the row and the turn"""
    return bad_input_trial(ctx, "empty-q", expect="empty", question="   ")


@fault("unicode-answer", "bad-input")
def unicode_answer(ctx: Context, trial: int) -> Trial:
    """an answer in non-ASCII unicode ('café ☕ 猫'): valid data, every stage completes"""
    return bad_input_trial(ctx, "unicode", expect="ok", answer="café ☕ 猫")


@fault("zero-rows", "bad-input")
def zero_rows(ctx: Context, trial: int) -> Trial:
    """a benchmark with no question at all: prepare stops with 'no dialogue to build' naming
    the file"""
    return bad_input_trial(ctx, "zero-rows", expect="no dialogue", empty=True)
