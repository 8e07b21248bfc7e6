"""Reading and tokenizing hold what they keep, not the file: no whole-file bytes/text, no token columns in RAM."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

from orpo.data.files import read_file
from orpo.data.formats import normalize
from orpo.data.pipeline import tokenize_pairs
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
def test_reading_jsonl_holds_where_each_row_is_not_the_rows(hh_path, tmp_path, name):
    """The rows are parsed as they are used: opening a file keeps 16 bytes a row (line, position)."""
    path = _hh_file(hh_path, tmp_path / name, 2000)
    with gzip.open(path, "rt") if name.endswith(".gz") else path.open() as f:
        rows = [json.loads(line) for line in f]
        text_size = f.tell() if not name.endswith(".gz") else sum(len(json.dumps(r)) for r in rows)
    tracemalloc.start()
    try:
        source = read_file(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 0.02 * text_size and peak < 0.05 * text_size, (kept, peak, text_size)
    assert len(source) == 2000 and source.number(1999) == 2000
    assert list(source.rows) == rows and source.rows[1234] == rows[1234] and source.rows[-1] == rows[-1]


def test_normalizing_into_a_store_holds_no_list_of_pairs(hh_path, tmp_path):
    """``normalize(store=)`` writes the pairs to Arrow as they come: memory held is a batch, not the data."""
    path = _hh_file(hh_path, tmp_path / "pairs.jsonl", 8000)
    expected = normalize(read_file(path)).pairs
    tracemalloc.start()
    try:
        stored = normalize(read_file(path), store=tmp_path / "pairs.arrow").pairs
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text_size = path.stat().st_size
    assert not isinstance(stored, list) and len(stored) == len(expected) > 7900
    assert kept < 0.05 * text_size and peak < 0.3 * text_size, (kept, peak, text_size)
    assert list(stored) == expected and stored[-1] == expected[-1]


def test_tokenized_columns_are_written_to_disk_not_ram(hh_path, stories_tokenizer, tmp_path):
    """The token columns (the largest part of the data) go to an Arrow file a batch at a time."""
    pairs = normalize(read_file(_hh_file(hh_path, tmp_path / "pairs.jsonl", 600))).pairs
    template = resolve_chat_template("none", stories_tokenizer)
    before = pa.total_allocated_bytes()
    ds = tokenize_pairs(pairs, template, stories_tokenizer, Limits(max_length=1024), work_dir=tmp_path)
    held = pa.total_allocated_bytes() - before
    assert len(ds) == len(pairs) and ds.cache_files and Path(ds.cache_files[0]["filename"]).parent == tmp_path
    # the token ids themselves (int32), memory-mapped
    assert ds.data.nbytes > 1_000_000
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


def _standard_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}\nwith a second line", "chosen": "yes, " * 200 + str(i), "rejected": "no"}
            for i in range(n)]


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.csv.gz"])
def test_csv_rows_are_parsed_as_they_are_used(tmp_path, name):
    """Was: the file's bytes and text read whole, then a list of every row."""
    import csv
    import io

    rows = _standard_rows(3000)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["prompt", "chosen", "rejected"])
    writer.writeheader()
    writer.writerows(rows)
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.getvalue().encode()) if name.endswith(".gz") else text.getvalue().encode())
    tracemalloc.start()
    try:
        source = read_file(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(text.getvalue())
    assert kept < 0.01 * size and peak < 0.1 * size, (kept, peak, size)
    assert len(source) == 3000 and source.where(2999) == f"{path} row 3000"
    assert list(source.rows) == rows and source.rows[1234] == rows[1234] and source.rows[-1] == rows[-1]


def test_parquet_rows_are_read_a_batch_of_a_row_group_at_a_time(tmp_path):
    """Was: the file read whole, then ``to_pylist()`` of the whole table."""
    import pyarrow.parquet as pq

    from orpo.data.files import ParquetRows

    rows = _standard_rows(20000)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=2000)
    source = read_file(tmp_path / "pairs.parquet")
    assert isinstance(source.rows, ParquetRows) and len(source) == 20000
    base, high = pa.total_allocated_bytes(), 0
    seen = []
    for row in source.rows:
        seen.append(row)
        high = max(high, pa.total_allocated_bytes() - base)
    assert seen == rows and source.rows[4321] == rows[4321] and source.rows[-1] == rows[-1]
    # Arrow's reader reads a row group or two ahead: a few of the ten row groups, never the file
    assert high < 4 * table.nbytes / 10, (high, table.nbytes)


def test_max_samples_stops_reading_at_the_first_n_pairs(tmp_path, stories_tokenizer):
    """``data.max_samples`` with one source: rows past the first N pairs are never read (a bad one there is no error)."""
    from orpo.config import DataConfig
    from orpo.data.pipeline import prepare_data

    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": f"question {i}", "chosen": "yes", "rejected": "no"}) for i in range(100)]
    lines[60] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=str(path), max_length=64, max_samples=40, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, stories_tokenizer, chat_template="none")
    assert prepared.summary.rows_read == 40 and len(prepared.train) == 40
    with pytest.raises(Exception, match="line 61: malformed JSON"):
        prepare_data(cfg.model_copy(update={"max_samples": 70}), stories_tokenizer, chat_template="none")


def test_streamed_and_mapped_tokenization_give_the_same_rows(hh_path, stories_tokenizer, tmp_path):
    """The cached path streams pairs file -> tokens file -> kept file; without a cache it is ``datasets.map``."""
    from orpo.config import DataConfig
    from orpo.data.pipeline import prepare_data

    cfg = DataConfig(train=str(hh_path), max_length=96, max_prompt_length=48, eval_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    streamed = prepare_data(cfg, stories_tokenizer, chat_template="chatml")
    mapped = prepare_data(cfg, stories_tokenizer, chat_template="chatml", use_cache=False)
    assert streamed.cache_path is not None and mapped.cache_path is None
    for a, b in ((streamed.train, mapped.train), (streamed.eval, mapped.eval)):
        assert a.column_names == b.column_names and a.to_dict() == b.to_dict()
    assert streamed.summary.to_dict() == mapped.summary.to_dict()
