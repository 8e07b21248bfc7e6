"""Normalized pairs on disk: one Arrow file per source, read back a batch at a time.

Normalization writes each source's valid pairs here as it reads them, so a dataset of any size
costs the pipeline a batch of pairs in memory, not every pair. Mixing, ``max_samples`` and the eval
split pick positions (``select``, a lazy index over the file), the checks stream through the
pairs once, and tokenization maps over the file itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets

from orpo.data.formats import Pair
from orpo.data.sources import LazyRows
from orpo.data.tokenize import pair_columns, pairs_from_columns

BATCH = 1000
PAIR_FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
})


class PairWriter:
    """Appends pairs to an Arrow file at ``path``, ``BATCH`` at a time; ``close()`` gives them back."""

    def __init__(self, path: Path) -> None:
        from datasets.arrow_writer import ArrowWriter

        self.path = path
        self._writer = ArrowWriter(features=PAIR_FEATURES, path=str(path), writer_batch_size=BATCH)
        self._pending: list[Pair] = []

    def append(self, pair: Pair) -> None:
        self._pending.append(pair)
        if len(self._pending) == BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pair_columns(self._pending))
            self._pending = []

    def close(self) -> StoredPairs:
        self._flush()
        self._writer.finalize()
        self._writer.close()
        return StoredPairs(datasets.Dataset.from_file(str(self.path)))

    def abort(self) -> None:
        self._writer.close()
        self.path.unlink(missing_ok=True)


class StoredPairs(LazyRows[Pair]):
    """Pairs in an Arrow file (memory-mapped) as a sequence, read a batch at a time."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int) -> Pair:
        return pairs_from_columns(self.dataset[i:i + 1])[0]

    def __iter__(self) -> Iterator[Pair]:
        for columns in column_batches(self.dataset, BATCH):
            yield from pairs_from_columns(columns)


def whole_file(dataset: datasets.Dataset) -> str | None:
    """The Arrow file ``dataset`` is, all its rows in order (no selection or slice of it), or None."""
    files = dataset.cache_files
    # datasets has no public test for a selection: an indices mapping, or a slice of the table
    if len(files) != 1 or getattr(dataset, "_indices", None) is not None:
        return None
    path = files[0]["filename"]
    return path if datasets.Dataset.from_file(path).num_rows == len(dataset) else None


def column_batches(dataset: datasets.Dataset, size: int) -> Iterator[dict[str, list]]:
    """``dataset``'s rows in order as column dicts of up to ``size`` rows.

    A whole file is read as a stream: the pages of a memory-mapped file count in this process's
    resident memory once read, a stream's only one batch at a time. A selection is read through
    ``datasets``.
    """
    path = whole_file(dataset)
    if path is None:
        for start in range(0, len(dataset), size):
            yield dataset[start:start + size]
        return
    import pyarrow as pa

    with pa.OSFile(path) as f:
        for batch in pa.ipc.open_stream(f):
            for start in range(0, batch.num_rows, size):
                yield batch.slice(start, size).to_pydict()


def select(pairs: Sequence[Pair], positions: Sequence[int]) -> Sequence[Pair]:
    """``pairs`` at ``positions``, lazily (an index over the file) for pairs on disk."""
    if isinstance(pairs, StoredPairs):
        return StoredPairs(pairs.dataset.select(positions))
    return [pairs[i] for i in positions]


def join(a: Sequence[Pair], b: Sequence[Pair]) -> Sequence[Pair]:
    """``a`` then ``b``, lazily for pairs on disk."""
    if isinstance(a, StoredPairs) or isinstance(b, StoredPairs):
        if not len(a):
            return b
        if not len(b):
            return a
        return StoredPairs(datasets.concatenate_datasets([_dataset(a), _dataset(b)]))
    return [*a, *b]


def _dataset(pairs: Sequence[Pair]) -> datasets.Dataset:
    if isinstance(pairs, StoredPairs):
        return pairs.dataset
    return datasets.Dataset.from_dict(pair_columns(pairs), features=PAIR_FEATURES)
