"""Reading rows: every local file type (plain and .gz), error locations, hub-name parsing (no network)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orpo.data import sources
from orpo.data.formats import Pair, normalize
from orpo.data.sources import DataError, DataFileNotFoundError, RowSource, load_rows, parse_hub_spec

STANDARD_ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": " 4.", "rejected": " 5, I think."},
    # Commas, quotes, newlines and non-ASCII text must survive every writer and reader.
    {"prompt": 'Say "hi", twice\nplease', "chosen": "hi, hi", "rejected": "Grüße\n\nbye"},
]
CONVERSATIONAL_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    },
    {
        "prompt": [{"role": "user", "content": "2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "22"}],
    },
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file name asks for (independently of the code under test)."""
    suffix = path.suffixes[-2] if path.suffix == ".gz" else path.suffix
    if suffix == ".jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif suffix == ".json":
        data = json.dumps(rows).encode()
    elif suffix == ".csv":
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
    elif suffix == ".parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data = sink.getvalue().to_pybytes()
    else:
        raise AssertionError(f"unknown suffix {suffix}")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


ALL_TYPES = ["jsonl", "json", "csv", "parquet"]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("ext", ALL_TYPES)
def test_standard_rows_read_back_from_every_file_type(tmp_path, ext, gz):
    path = write_rows(tmp_path / f"pairs.{ext}{'.gz' if gz else ''}", STANDARD_ROWS)
    source = load_rows(str(path))
    assert list(source.rows) == STANDARD_ROWS
    assert source.name == str(path)
    normalized = normalize(source)
    assert normalized.format == "standard"
    assert normalized.pairs == [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in STANDARD_ROWS]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])  # CSV has no nested values
def test_conversational_rows_read_back(tmp_path, ext, gz):
    path = write_rows(tmp_path / f"chat.{ext}{'.gz' if gz else ''}", CONVERSATIONAL_ROWS)
    normalized = normalize(load_rows(str(path)))
    assert normalized.format == "conversational"
    assert normalized.pairs == [
        Pair(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in CONVERSATIONAL_ROWS
    ]


def test_jsonl_where_counts_physical_lines_including_blank_ones(tmp_path):
    path = tmp_path / "gaps.jsonl"
    row = json.dumps(STANDARD_ROWS[0])
    path.write_text(f"{row}\n\n   \n{row}\r\n{row}")  # blank lines skipped but counted; CRLF tolerated
    source = load_rows(str(path))
    assert len(source) == 3
    assert [source.where(i) for i in range(3)] == [f"{path} line {n}" for n in (1, 4, 5)]


def test_json_and_csv_where_counts_rows(tmp_path):
    for ext in ("json", "csv"):
        source = load_rows(str(write_rows(tmp_path / f"d.{ext}", STANDARD_ROWS)))
        assert source.where(1) == f"{tmp_path / f'd.{ext}'} row 2"


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "u2028.jsonl"
    text = "one\u2028two"
    path.write_text(json.dumps({"prompt": text, "chosen": "a", "rejected": "b"}, ensure_ascii=False) + "\n")
    assert load_rows(str(path)).rows[0]["prompt"] == text


def test_real_hh_file_reads_every_line(hh_path):
    source = load_rows(str(hh_path))
    assert len(source) == 1800
    assert source.where(16) == f"{hh_path} line 17"
    assert set(source.rows[0]) == {"chosen", "rejected"}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_malformed_json_line_names_file_and_line(tmp_path, gz):
    good = json.dumps(STANDARD_ROWS[0])
    data = f"{good}\n{good}\n\n{{'prompt': 'single quotes'}}\n".encode()
    path = tmp_path / f"broken.jsonl{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(
        DataError, match=r"broken\.jsonl(\.gz)? line 4: malformed JSON: Expecting property name"
    ):
        normalize(load_rows(str(path)))  # a bad line keeps its place: on_bad_row decides


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text(json.dumps(STANDARD_ROWS[0]) + '\n["prompt", "chosen"]\n')
    with pytest.raises(DataError, match=r"lists\.jsonl line 2: expected a JSON object, got list"):
        normalize(load_rows(str(path)))


def test_json_must_be_a_top_level_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": STANDARD_ROWS}))
    with pytest.raises(DataError, match=r"wrapped\.json: expected a top-level JSON list of rows, got dict"):
        load_rows(str(path))
    path.write_text(json.dumps([STANDARD_ROWS[0], "text"]))
    with pytest.raises(DataError, match=r"wrapped\.json row 2: expected a JSON object, got str"):
        normalize(load_rows(str(path)))
    path.write_text('[{"prompt": "x",]')
    with pytest.raises(DataError, match=r"wrapped\.json: malformed JSON: .* line 1 column"):
        load_rows(str(path))


def test_unreadable_files_are_data_errors(tmp_path):
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_text("not gzip at all")
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz: cannot read"):
        load_rows(str(fake_gz))
    fake_parquet = tmp_path / "fake.parquet"
    fake_parquet.write_text("not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: cannot read Parquet"):
        load_rows(str(fake_parquet))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not valid UTF-8"):
        load_rows(str(latin1))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unknown file type; expected one of \.jsonl"):
        load_rows(str(text))
    with pytest.raises(DataError, match="is a directory"):
        load_rows(str(tmp_path))


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub must not be tried: {args} {kwargs}")

    monkeypatch.setattr(sources, "load_hub", refuse)


@pytest.mark.parametrize(
    "spec", ["missing.jsonl", "org/name.json", "data/train.parquet.gz", "./org/name", "/no/such"]
)
def test_missing_path_is_file_not_found_never_the_hub(tmp_path, monkeypatch, no_hub, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileNotFoundError, match=f"{spec}: no such file") as info:
        load_rows(spec)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)


def test_spec_that_is_neither_file_nor_hub_name(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="neither an existing file nor a hub dataset name"):
        load_rows("just-a-word")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("Anthropic/hh-rlhf", ("Anthropic/hh-rlhf", "train")),
        (
            "argilla/ultrafeedback-binarized-preferences-cleaned:test",
            ("argilla/ultrafeedback-binarized-preferences-cleaned", "test"),
        ),
        ("org/name:train[:1000]", ("org/name", "train[:1000]")),
        ("org/name.v2:test_prefs", ("org/name.v2", "test_prefs")),
        ("org/name:", None),
        ("hh-rlhf", None),
        ("a/b/c", None),
        ("/org/name", None),
    ],
)
def test_parse_hub_spec(spec, expected):
    assert parse_hub_spec(spec, "train") == expected


def test_hub_name_goes_to_the_hub_with_its_split(tmp_path, monkeypatch):
    """Only the routing is checked: the loader is replaced so that no network is touched."""
    calls = []

    def fake_hub(name, split, subset=None):
        calls.append((name, split, subset))
        return RowSource(name=f"{name}:{split}", rows=[])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "load_hub", fake_hub)
    load_rows("org/prefs", split="validation", subset="en")
    load_rows("org/prefs:test", split="validation")
    assert calls == [("org/prefs", "validation", "en"), ("org/prefs", "test", None)]
