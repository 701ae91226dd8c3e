"""Command line: build MT-GQA or MT-VQA-v2 and write it as an Arrow dialogue dataset.

Examples::

    python -m mc_core.data.build --source gqa --questions testdev_balanced_questions.json \\
        --images gqa/images --out data/mt-gqa
    python -m mc_core.data.build --source vqav2 \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images coco/val2014 \\
        --out data/mt-vqav2 --max-dialogues 25000 --seed 0

The output is written atomically (:func:`mc_core.data.schema.save`); ``--count`` only prints
how many dialogues the question files give (no image is read).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mc_core.data import gqa, schema, vqav2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mc_core.data.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True, choices=["gqa", "vqav2"])
    p.add_argument("--questions", required=True, help="questions JSON (or saved dataset, gqa)")
    p.add_argument("--annotations", help="VQAv2 annotations JSON (vqav2 only)")
    p.add_argument("--images", help="image folder (or saved dataset of images)")
    p.add_argument("--out", help="output folder of the Arrow dataset")
    p.add_argument(
        "--split",
        help="COCO split in image file names (vqav2; default: the questions' data_subtype)",
    )
    p.add_argument(
        "--max-dialogues",
        type=int,
        default=None,
        help="seeded random subset of this many dialogues (training subsets)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-verify-images",
        action="store_true",
        help="skip decoding each image once before writing",
    )
    p.add_argument("--cache-dir", help="datasets cache folder for the Arrow shards")
    p.add_argument("--count", action="store_true", help="only print the number of dialogues")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv``, builds the dataset and writes it; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.source == "vqav2" and not args.annotations:
        parser.error("--annotations is required with --source vqav2")
    if args.source == "gqa" and (args.annotations or args.split):
        parser.error("--annotations and --split apply to --source vqav2 only")
    if not args.count and (not args.images or not args.out):
        parser.error("--images and --out are required (unless --count)")
    try:
        if args.count:
            if args.source == "gqa":
                n = gqa.count_dialogues(args.questions)
            else:
                n = len(vqav2.plan(args.questions, args.annotations)[0])
            print(n)
            return 0
        common = dict(
            max_dialogues=args.max_dialogues,
            seed=args.seed,
            verify_images=not args.no_verify_images,
            cache_dir=args.cache_dir,
        )
        if args.source == "gqa":
            ds = gqa.build(args.questions, args.images, **common)
        else:
            ds = vqav2.build(
                args.questions, args.annotations, args.images, split=args.split, **common
            )
        out = schema.save(ds, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(ds)} {args.source} dialogues to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
