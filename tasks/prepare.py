"""Stage ``prepare``: the dialogue datasets ``data/train`` and ``data/test``.

Each split is the embedded synthetic world (``mc_core.data.synthetic.generate``) or a real
benchmark built from local files (MT-GQA: ``mc_core.data.gqa.build``; MT-VQA-v2:
``mc_core.data.vqav2.build``), as ``params.yaml: data.<split>`` says. Writes the Arrow datasets
(atomically, via ``mc_core.data.schema.save``) and ``reports/data.json`` (counts per split).

Usage: ``python -m tasks.prepare``
"""

from __future__ import annotations

from mc_core import config
from tasks import common

PARAMS = ("data", "world")


def build_split(split: config.SplitParams, world: dict, *, where: str):
    """The dataset of one split (validated against the dialogue schema by its builder)."""
    if split.source == "synthetic":
        from mc_core.data import synthetic

        cfg = synthetic.WorldConfig.from_dict(world, where="world")
        return synthetic.generate(split.dialogues, split.seed, cfg)
    if split.source == "gqa":
        from mc_core.data import gqa

        return gqa.build(split.questions, split.images, max_dialogues=split.dialogues,
                         seed=split.seed)
    from mc_core.data import vqav2

    return vqav2.build(split.questions, split.annotations, split.images, split=split.split,
                       max_dialogues=split.dialogues, seed=split.seed)


def main() -> None:
    """Build both splits, save them, write the counts."""
    from mc_core.data import schema

    p = common.load_params(PARAMS, who="tasks.prepare")
    counts = {}
    for name, split, path in (("train", p.data.train, common.DATA_TRAIN),
                              ("test", p.data.test, common.DATA_TEST)):
        print(f"prepare: data/{name} <- {split.source} ({split.dialogues or 'all'} dialogues)",
              flush=True)
        ds = build_split(split, p.world, where=f"data.{name}")
        schema.save(ds, path)
        counts[name] = {"source": split.source, "dialogues": len(ds),
                        "images": len(set(ds["image_id"]))}
    common.write_json("reports/data.json", counts)


if __name__ == "__main__":
    main()
