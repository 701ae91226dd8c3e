"""Writing a dialogue dataset to a ``save_to_disk`` folder in bounded resident memory.

``datasets`` memory-maps the Arrow files behind a dataset, and ``Dataset.save_to_disk`` reads
every row through that mapping: each page it touches stays mapped, and counted in the process'
resident set, until the dataset is dropped. Saving a 20k-dialogue MT-GQA build that way ends
with the whole dataset resident (about 0.8 GB of JPEGs; train-balanced's 300k dialogues would be
tens of GB), and it copies 1,000 rows of images at a time, several times over.
:func:`save_to_disk` writes the folder ``save_to_disk`` writes, but reads a file-backed
dataset's Arrow files with plain reads, one record batch at a time, and hands the writer 100
rows at a time.

The folder (tests compare it with ``save_to_disk``'s): the shards ``data-<i>-of-<n>.arrow``, as
many as ``save_to_disk`` makes (``config.MAX_SHARD_SIZE``, 500 MB), with the same rows in the
same record batches, written by its ``ArrowWriter`` (which embeds the images); ``state.json`` and
``dataset_info.json`` byte for byte. Only Arrow's buffer padding may differ. Any other dataset
(in memory, e.g. the synthetic world's; with an indices mapping, a format or transforms to
replay) goes through ``save_to_disk`` itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

__all__ = ["mapped_files", "save_to_disk"]

# Transforms datasets replays on a mapped file that leave its rows as the file has them (loading
# replaces the schema's metadata with the features'; the writer sets its own metadata anyway).
_SAME_ROWS = frozenset({"replace_schema_metadata", "combine_chunks"})

# save_to_disk's state.json: these attributes of the dataset, plus _split and _data_files.
_STATE_KEYS = (
    "_fingerprint",
    "_format_columns",
    "_format_kwargs",
    "_format_type",
    "_output_all_columns",
)


def mapped_files(ds: datasets.Dataset) -> list[str] | None:
    """The Arrow files whose rows, in order, are exactly ``ds``'s rows, or None when ``ds`` is
    anything else (in memory, an indices mapping, a format, transforms to replay, no rows)."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if ds._indices is not None or ds._format_type is not None or ds.list_indexes() or not len(ds):
        return None
    table = ds.data
    if isinstance(table, MemoryMappedTable):
        blocks = [table]
    elif isinstance(table, ConcatenationTable) and all(len(r) == 1 for r in table.blocks):
        blocks = [r[0] for r in table.blocks]  # files one after the other, no column joins
    else:
        return None
    for b in blocks:
        if not isinstance(b, MemoryMappedTable) or any(r[0] not in _SAME_ROWS for r in b.replays):
            return None
    return [b.path for b in blocks]


class _Rows:
    """The rows of Arrow stream files, in order, read without mapping them: ``take(k)`` gives
    the next ``k`` rows as a table; at most one record batch beyond them is in memory."""

    def __init__(self, files: list[str]):
        self._files = files
        self._batches = self._read(files)
        self._pending: list[pa.RecordBatch] = []
        self._have = 0

    @staticmethod
    def _read(files: list[str]) -> Iterator[pa.RecordBatch]:
        for path in files:
            with pa.OSFile(path, "rb") as f:
                yield from pa.ipc.open_stream(f)

    def take(self, k: int) -> pa.Table:
        while self._have < k:
            batch = next(self._batches, None)
            if batch is None:
                raise ValueError(f"{self._files}: {k - self._have} rows fewer than expected")
            self._pending.append(batch)
            self._have += batch.num_rows
        table = pa.Table.from_batches(self._pending)
        rest = table.slice(k)
        self._pending, self._have = rest.to_batches(), rest.num_rows
        return table.slice(0, k)


def _estimate_nbytes(ds: datasets.Dataset) -> int:
    """``ds._estimate_nbytes()``, on which save_to_disk's shard count and table size depend,
    without its ``to_pylist`` of the first 1,000 rows' images (41 MB of JPEGs copied, and
    mapped, for MT-GQA): the cells it looks for, a path and no bytes, are found from the
    validity bitmaps. ``ds`` is one :func:`mapped_files` accepts (no indices mapping)."""
    import pyarrow.compute as pc
    from datasets.download.streaming_download_manager import xgetsize
    from datasets.features import Audio, Image, Video
    from datasets.features.features import require_decoding
    from datasets.table import table_visitor

    nbytes = ds.data.nbytes
    features = ds.info.features
    if not len(ds) or not any(
        require_decoding(f, ignore_decode_attribute=True) for f in features.values()
    ):
        return nbytes
    extra = 0

    def visit(array: pa.Array, feature: Any) -> None:
        nonlocal extra
        if isinstance(feature, Audio | Image | Video):
            path = array.field("path")
            only_path = pc.and_(
                array.is_valid(), pc.and_(array.field("bytes").is_null(), path.is_valid())
            )
            extra += sum(xgetsize(p) for p in pc.filter(path, only_path).to_pylist())
            extra -= path.nbytes

    head = ds.with_format("arrow")[:1000]
    table_visitor(head, visit)
    return nbytes + extra * len(ds.data) // len(head)


def save_to_disk(ds: datasets.Dataset, folder: str | os.PathLike) -> None:
    """``ds.save_to_disk(folder)``, without mapping a file-backed dataset's files (module
    docstring); the folder may exist (empty)."""
    files = mapped_files(ds)
    if files is None:
        ds.save_to_disk(str(folder))
        return
    from datasets import config
    from datasets.arrow_writer import ArrowWriter, get_writer_batch_size_from_data_size
    from datasets.utils.py_utils import asdict, convert_file_size_to_int

    # save_to_disk's sizes: shards of at most MAX_SHARD_SIZE, contiguous, the first
    # len % shards one row longer, each written in tables of `batch` rows.
    n, nbytes = len(ds), _estimate_nbytes(ds)
    shards = min(n, int(nbytes / convert_file_size_to_int(config.MAX_SHARD_SIZE)) + 1)
    batch = config.DEFAULT_MAX_BATCH_SIZE
    if nbytes > 0:
        batch = min(batch, get_writer_batch_size_from_data_size(n, nbytes))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    rows = _Rows(files)
    for i, name in enumerate(names):
        size = n // shards + (1 if i < n % shards else 0)
        path = str(folder / name)
        with ArrowWriter(features=ds.features, path=path, embed_local_files=True) as w:
            # The writer cuts each table into record batches of its writer_batch_size (100 rows
            # with images); when that divides `batch`, tables of that size give the same record
            # batches with a tenth of the images in memory.
            step = w.writer_batch_size if batch % w.writer_batch_size == 0 else batch
            for start in range(0, size, step):
                w.write_table(rows.take(min(step, size - start)))
            w.finalize()
    state = {key: ds.__dict__[key] for key in _STATE_KEYS}
    state["_split"] = str(ds.split) if ds.split is not None else None
    state["_data_files"] = [{"filename": name} for name in names]
    with open(folder / config.DATASET_STATE_JSON_FILENAME, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    info = asdict(ds.info)
    with open(folder / config.DATASET_INFO_FILENAME, "w", encoding="utf-8") as f:
        # Top-level keys sorted, nested ones as they are (their order is the features' order).
        json.dump({key: info[key] for key in sorted(info)}, f, indent=2)
