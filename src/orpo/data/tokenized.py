"""Tokenized sets on disk: pairs -> token columns (streamed file to file, or ``datasets.map``),
dropped pairs removed, a split written as one Arrow file; each step reads its input as a stream, so
no set is ever whole in RAM (mapped pages would count as resident memory too)."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from orpo.data import stored
from orpo.data.formats import Pair
from orpo.data.templates import ChatTemplate
from orpo.data.tokenize import (
    OUTPUT_COLUMNS,
    STAT_COLUMNS,
    Limits,
    pair_columns,
    tokenize_batch,
)


def tokenize_pairs(pairs: Sequence[Pair], template: ChatTemplate, tokenizer, limits: Limits,
                   num_proc: int | None = None, fingerprint: str | None = None,
                   work_dir: Path | None = None) -> datasets.Dataset:
    """Render + tokenize with ``Dataset.map`` (batched; ``num_proc`` workers): token + stat columns.

    With ``work_dir`` the pairs (unless already on disk) and their tokens are written there as Arrow
    files a batch at a time and memory-mapped back, so neither ever sits in RAM whole.
    """
    name = fingerprint or uuid.uuid4().hex
    if isinstance(pairs, stored.StoredPairs):
        ds = pairs.dataset
    elif work_dir is not None:
        writer = stored.PairWriter(work_dir / f"{name}-pairs.arrow")
        for pair in pairs:
            writer.append(pair)
        ds = writer.close().dataset
    else:
        ds = datasets.Dataset.from_dict(pair_columns(pairs), features=stored.PAIR_FEATURES)
    fn_kwargs = {"template": template, "tokenizer": tokenizer, "limits": limits}
    if work_dir is not None and not (num_proc and num_proc > 1):
        return _tokenize_to_file(ds, work_dir / f"{name}-tokens.arrow", fn_kwargs)
    # a batch's tokens exist as Python lists (~100 bytes a token) until written: the batch bounds that;
    # new_fingerprint skips hashing the tokenizer (our own cache key covers it)
    return ds.map(
        tokenize_batch,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > num_proc else None,
        remove_columns=ds.column_names,
        features=TOKEN_FEATURES,
        fn_kwargs=fn_kwargs,
        new_fingerprint=fingerprint,
        cache_file_name=str(work_dir / f"{name}-tokens.arrow") if work_dir is not None else None,
        writer_batch_size=TOKENIZE_BATCH,
        desc="tokenizing",
    )


def _tokenize_to_file(ds: datasets.Dataset, path: Path, fn_kwargs: dict[str, Any]) -> datasets.Dataset:
    """``ds.map(tokenize_batch)`` in this process, reading the pairs as a stream (``stored.column_batches``)
    and writing the tokens to ``path`` a batch at a time, memory-mapped back."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.tqdm import tqdm

    start = 0
    with ArrowWriter(features=TOKEN_FEATURES, path=str(path), writer_batch_size=TOKENIZE_BATCH) as writer, \
            tqdm(total=len(ds), desc="tokenizing", unit=" examples") as progress:
        for columns in stored.column_batches(ds, TOKENIZE_BATCH):
            n = len(columns["chosen"])
            writer.write_batch(tokenize_batch(columns, list(range(start, start + n)), **fn_kwargs))
            start += n
            progress.update(n)
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


TOKENIZE_BATCH = 256


# token ids as int32 (every vocabulary fits): half the bytes on disk and in the page cache of int64
TOKEN_FEATURES = datasets.Features({
    "chosen_input_ids": datasets.Sequence(datasets.Value("int32")),
    "chosen_prompt_len": datasets.Value("int32"),
    "rejected_input_ids": datasets.Sequence(datasets.Value("int32")),
    "rejected_prompt_len": datasets.Value("int32"),
    "prompt_tokens": datasets.Value("int32"),
    "chosen_tokens": datasets.Value("int32"),
    "rejected_tokens": datasets.Value("int32"),
    "truncated": datasets.Value("bool"),
    "drop_reason": datasets.Value("string"),
})


def stat_columns(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    """The statistics columns of a tokenized set; a whole work file is read as a stream (its mapped
    pages, token ids around the small statistics buffers included, would count as resident)."""
    whole = stored.whole_file(ds)
    if whole is None:
        return {c: np.asarray(ds[c]) for c in STAT_COLUMNS}
    import pyarrow as pa

    parts: dict[str, list[np.ndarray]] = {c: [] for c in STAT_COLUMNS}
    with pa.OSFile(whole) as f:
        for batch in pa.ipc.open_stream(f):
            for c in STAT_COLUMNS:
                column = batch.column(c)
                # a copy: a zero-copy view would keep the whole batch, token ids and all, alive
                parts[c].append(_reasons(column) if c == "drop_reason" else column.to_numpy(zero_copy_only=False).copy())
    return {c: np.concatenate(v) if v else np.asarray(ds[c]) for c, v in parts.items()}


def _reasons(column) -> np.ndarray:
    """The drop reasons as an object array pointing at the few distinct strings: 8 bytes a pair, where
    ``np.asarray`` of the strings makes a ``<U20`` array of 80 bytes a pair."""
    encoded = column.dictionary_encode()
    names = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    return names[encoded.indices.to_numpy(zero_copy_only=False)]


def drop_rows(ds: datasets.Dataset, path: Path | None = None) -> tuple[datasets.Dataset, dict[str, int]]:
    """Remove dropped pairs and the statistics columns -> (dataset, reason -> count); with ``path``,
    the kept rows are written there (``_drop_to_file``)."""
    if path is not None:
        return _drop_to_file(ds, path)
    reasons = np.asarray(ds["drop_reason"])
    keep = np.flatnonzero(reasons == "")
    counts = {str(r): int(n) for r, n in zip(*np.unique(reasons[reasons != ""], return_counts=True), strict=True)}
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds.remove_columns(list(STAT_COLUMNS)), counts


def _drop_to_file(ds: datasets.Dataset, path: Path) -> tuple[datasets.Dataset, dict[str, int]]:
    """``drop_rows`` for a tokenized set in a work file: the kept rows' token columns, streamed into ``path``.

    The work file is read as a stream, a batch at a time, not memory-mapped: a mapped copy would
    put every page of it in this process's resident memory. Anything but one whole file (the
    shards of a ``num_proc`` map) goes through ``drop_rows``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.arrow_writer import ArrowWriter

    whole = stored.whole_file(ds)
    if whole is None:
        return drop_rows(ds)
    reasons: Counter[str] = Counter()
    features = datasets.Features({c: TOKEN_FEATURES[c] for c in OUTPUT_COLUMNS})
    with ArrowWriter(features=features, path=str(path), writer_batch_size=TOKENIZE_BATCH) as writer, \
            pa.OSFile(whole) as f:
        for batch in pa.ipc.open_stream(f):
            reason = batch.column("drop_reason")
            reasons.update(r for r in reason.to_pylist() if r)
            kept = batch.filter(pc.equal(reason, "")).select(list(OUTPUT_COLUMNS))
            writer.write_table(pa.Table.from_batches([kept]))
        writer.finalize()
    return datasets.Dataset.from_file(str(path)), dict(reasons)


def write_split(ds: datasets.Dataset, path: Path) -> None:
    """``ds`` as one Arrow file at ``path``: a hard link when it is one whole file already (the work
    folder's, on the same disk), else written a batch at a time."""
    from datasets.arrow_writer import ArrowWriter

    whole = stored.whole_file(ds)
    if whole is not None:
        try:
            os.link(whole, path)
            return
        except OSError:
            pass
    with ArrowWriter(features=ds.features, path=str(path), writer_batch_size=TOKENIZE_BATCH) as writer:
        for table in ds.with_format("arrow").iter(batch_size=TOKENIZE_BATCH):
            writer.write_table(table)
        writer.finalize()
