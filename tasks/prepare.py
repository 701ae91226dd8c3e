"""Stage ``prepare``: the dialogue datasets ``data/train``, ``data/val`` and ``data/test``.

Each split is the embedded synthetic world (``mc_core.data.synthetic.generate``) or a real
benchmark built from local files (MT-GQA: ``mc_core.data.gqa.build``; MT-VQA-v2:
``mc_core.data.vqav2.build``) or your own dialogues from a ``save_to_disk`` folder
(``mc_core.data.dataset.build``; docs/data.md), as ``params.yaml: data.<split>`` says.
``data.val`` is where recipes are tuned and the registry's champion is chosen; without it
``data/val`` is an empty folder (DVC declares it) and the registry's gate is off. Writes the
Arrow datasets (atomically, via ``mc_core.data.schema.save``) and ``reports/data.json`` (counts
per split).

Usage: ``python -m tasks.prepare``
"""

from __future__ import annotations

from tasks import common, params

PARAMS = ("data", "world")


def build_split(split: params.SplitParams, world, *, where: str):
    """The dataset of one split (validated against the dialogue schema by its builder)."""
    if split.source == "synthetic":
        from mc_core.data import synthetic

        return synthetic.generate(split.dialogues, split.seed, world)  # a validated WorldConfig
    if split.source == "gqa":
        from mc_core.data import gqa

        return gqa.build(
            split.questions, split.images, max_dialogues=split.dialogues, seed=split.seed
        )
    if split.source == "dataset":
        from mc_core.data import dataset

        return dataset.build(split.path, max_dialogues=split.dialogues, seed=split.seed)
    from mc_core.data import vqav2

    return vqav2.build(
        split.questions,
        split.annotations,
        split.images,
        split=split.split,
        max_dialogues=split.dialogues,
        seed=split.seed,
    )


def main() -> None:
    """Build the splits, save them, write the counts."""
    from mc_core.data import schema

    p = common.load_params(PARAMS, who="tasks.prepare")
    counts = {}
    splits = [
        ("train", p.data.train, common.DATA_TRAIN),
        ("val", p.data.val, common.DATA_VAL),
        ("test", p.data.test, common.DATA_TEST),
    ]
    built = {}
    # Every split is built (and so checked) before any is written: a bad input of one split
    # leaves the previous outputs of all of them in place.
    for name, split, _ in splits:
        if split is not None:
            print(
                f"prepare: data/{name} <- {split.source} ({split.dialogues or 'all'} dialogues)",
                flush=True,
            )
            built[name] = build_split(split, p.world, where=f"data.{name}")
    for name, split, path in splits:
        if split is None:  # no validation split: an empty folder keeps the DVC out declared
            with common.staged_dir(path):
                pass
            counts[name] = None
            continue
        ds = built[name]
        schema.save(ds, path)
        counts[name] = {
            "source": split.source,
            "dialogues": len(ds),
            "images": len(set(ds["image_id"])),
        }
    common.write_json("reports/data.json", counts)


if __name__ == "__main__":
    with common.stage("prepare"):
        main()
