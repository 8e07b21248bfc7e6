"""Reading and tokenizing hold what they keep, not the file: no whole-file bytes/text, no token columns in RAM."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

from orpo.data.formats import normalize
from orpo.data.pipeline import tokenize_pairs
from orpo.data.sources import read_file
from orpo.data.templates import resolve_chat_template
from orpo.data.tokenize import Limits


def _hh_file(hh_path: Path, out: Path, n: int) -> Path:
    """``n`` HH pairs with unique prompts (the shared 1,800 repeated, ``[#i]`` before each dialogue)."""
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with (gzip.open(out, "wt", encoding="utf-8") if out.suffix == ".gz" else out.open("w")) as f:
        for i in range(n):
            row = rows[i % len(rows)]
            f.write(json.dumps({k: f"[#{i}] {row[k]}" for k in ("chosen", "rejected")}) + "\n")
    return out


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_reading_jsonl_holds_only_the_rows_it_returns(hh_path, tmp_path, name):
    """The old reader held the bytes, the text and the list of lines beside the rows: 2x the rows' size more."""
    path = _hh_file(hh_path, tmp_path / name, 2000)
    with gzip.open(path) if name.endswith(".gz") else path.open("rb") as f:
        text_size = len(f.read())
    tracemalloc.start()
    try:
        source = read_file(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(source) == 2000 and source.number(1999) == 2000
    assert peak - kept < 0.25 * text_size, (peak - kept, text_size)


def test_tokenized_columns_are_written_to_disk_not_ram(hh_path, stories_tokenizer, tmp_path):
    """The token columns (the largest part of the data) go to an Arrow file a batch at a time."""
    pairs = normalize(read_file(_hh_file(hh_path, tmp_path / "pairs.jsonl", 600))).pairs
    template = resolve_chat_template("none", stories_tokenizer)
    before = pa.total_allocated_bytes()
    ds = tokenize_pairs(pairs, template, stories_tokenizer, Limits(max_length=1024), work_dir=tmp_path)
    held = pa.total_allocated_bytes() - before
    assert len(ds) == len(pairs) and ds.cache_files and Path(ds.cache_files[0]["filename"]).parent == tmp_path
    assert ds.data.nbytes > 2_000_000  # the token ids themselves, memory-mapped
    assert held < 0.1 * ds.data.nbytes, (held, ds.data.nbytes)


def test_a_dataset_stays_arrow_when_read(tmp_path):
    """A datasets.Dataset (hub data, train_data=) is read a batch at a time, never turned into a list."""
    import datasets

    from orpo.data.sources import rows_from_memory

    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(2500)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    source = rows_from_memory(datasets.load_from_disk(str(tmp_path / "ds")), "train_data")
    assert not isinstance(source.rows, list) and len(source) == 2500
    assert list(source.rows) == rows and source.rows[2499] == rows[2499] and source.where(7) == "train_data row 7"
