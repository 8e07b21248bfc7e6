"""Damaged files: cut anywhere (mid-line, mid-gzip-stream), bytes overwritten, Parquet files of any
schema, duplicate keys and columns, deep nesting, BOMs; and one regression test per bug the
generated data found, each with its minimal example."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile import (
    KINDS,
    MAX_LENGTH,
    ROWS,
    check_prepared,
    data_config,
    encode_file,
    examples,
    prepare,
    row_error,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo.data import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

FLAT = {"standard", "implicit", "columns"}
GOOD = {"prompt": "Hi there", "chosen": " yes", "rejected": " no"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile-files")


def _jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


# ------------------------------------------------------------------------------------------------
# Generated damage


def test_a_file_cut_anywhere_is_named_or_keeps_only_whole_rows(folder, stories_tokenizer):
    """A download or copy cut at any byte: plain or gzip, every kind. JSON Lines keeps exactly the
    whole lines before the cut (under skip the cut line is counted); a gzip stream is refused."""

    @settings(max_examples=examples(30))
    @given(fmt=st.sampled_from(sorted(ROWS)), kind=st.sampled_from(KINDS), data=st.data(), skip=st.booleans())
    def check(fmt, kind, data, skip):
        if fmt not in FLAT and kind.startswith("csv"):
            kind = "jsonl"
        rows = data.draw(st.lists(ROWS[fmt](strict=True), min_size=1, max_size=4))
        whole = encode_file(kind, rows)
        cut = data.draw(st.integers(1, len(whole) - 1))
        path = write(folder, kind, whole[:cut])
        cfg = data_config(path, on_bad_row="skip" if skip else "error")
        result = prepare(cfg, stories_tokenizer)
        if kind.endswith(".gz") or kind == "parquet":
            assert isinstance(result, DataError), "a cut gzip stream or Parquet file was read"
            return
        if isinstance(result, DataError):
            return  # named; check_error has looked at it
        check_prepared(result, cfg, stories_tokenizer)
        if kind == "jsonl":
            complete = whole[:cut].count(b"\n")
            partial = cut < len(whole) and not whole[:cut].endswith(b"\n")
            assert result.summary.rows_read == complete + partial
            assert result.summary.pairs == complete
            if partial:
                assert result.summary.dropped == {"bad row: malformed JSON": 1} | _token_drops(result)
                assert "is it cut short?" in result.summary.first_errors[0]

    check()


def test_overwritten_bytes_are_named_or_read_as_valid_rows(folder, stories_tokenizer):
    """64 bytes overwritten somewhere (a failing disk): a named error or valid pairs, never a crash."""

    @settings(max_examples=examples(30))
    @given(kind=st.sampled_from(KINDS), data=st.data(), skip=st.booleans())
    def check(kind, data, skip):
        rows = data.draw(st.lists(ROWS["standard"](strict=True), min_size=1, max_size=4))
        raw = bytearray(encode_file(kind, rows))
        at = data.draw(st.integers(0, len(raw) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=64))
        raw[at : at + len(junk)] = junk
        cfg = data_config(write(folder, kind, bytes(raw)), on_bad_row="skip" if skip else "error")
        result = prepare(cfg, stories_tokenizer)
        if not isinstance(result, DataError):
            check_prepared(result, cfg, stories_tokenizer)

    check()


def test_generated_duplicate_keys_are_named_wherever_they_are(folder, stories_tokenizer):
    """A key written twice, at any depth of any row (json.dumps cannot write one: the text is edited)."""

    @settings(max_examples=examples(20))
    @given(fmt=st.sampled_from(["standard", "conversational", "sharegpt"]), kind=st.sampled_from(["jsonl", "json"]),
           data=st.data())
    def check(fmt, kind, data):
        rows = data.draw(st.lists(ROWS[fmt](strict=True), min_size=1, max_size=4))
        at = data.draw(st.integers(0, len(rows) - 1))
        target = data.draw(st.sampled_from([d for d in _dicts(rows[at]) if d]))
        key = next(iter(target))
        texts = [_dumps(r, target if i == at else None) for i, r in enumerate(rows)]
        raw = ("\n".join(texts) + "\n") if kind == "jsonl" else "[" + ", ".join(texts) + "]"
        path = write(folder, kind, raw.encode())
        err = prepare(data_config(path), stories_tokenizer)
        assert isinstance(err, DataError) and "duplicate key" in str(err), err
        line, field = row_error(err)
        assert line == at + 1 and field is not None
        assert field.endswith(key if key.isprintable() else ascii(key)), (field, key)
        skipped = prepare(data_config(path, on_bad_row="skip"), stories_tokenizer)
        if not isinstance(skipped, DataError):
            assert skipped.summary.dropped.get("bad row: duplicate key") == 1

    check()


_TYPED = {
    "string": (pa.string(), st.text(max_size=8)),
    "large_string": (pa.large_string(), st.text(max_size=8)),
    "binary": (pa.binary(), st.binary(max_size=8)),
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "float": (pa.float64(), st.floats()),  # NaN and inf included
    "bool": (pa.bool_(), st.booleans()),
    "null": (pa.null(), st.none()),
    "timestamp": (pa.timestamp("s"), st.datetimes(min_value=datetime(1970, 1, 1))),
    "decimal": (pa.decimal128(10, 2), st.decimals(min_value=-1000, max_value=1000, places=2).filter(Decimal.is_finite)),
    "strings": (pa.list_(pa.string()), st.lists(st.text(max_size=4), max_size=3)),
    "message": (pa.struct([("role", pa.string()), ("content", pa.string())]),
                st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": st.text(max_size=6)})),
    "messages": (pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
                 st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                 "content": st.text(max_size=6)}), max_size=3)),
    "turn": (pa.struct([("from", pa.string()), ("value", pa.string())]),
             st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": st.text(max_size=6)})),
    "turns": (pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])),
              st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]),
                                              "value": st.text(max_size=6)}), max_size=3)),
    "map": (pa.map_(pa.string(), pa.string()), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
}
_NAMES = ["prompt", "chosen", "rejected", "conversations", "system", "question", "response_j", "response_k",
          "chosen_messages", "rejected_messages", "other"]


@st.composite
def parquet_tables(draw) -> pa.Table:
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=5, unique=True))
    columns = {}
    for name in names:
        arrow_type, values = _TYPED[draw(st.sampled_from(sorted(_TYPED)))]
        column = draw(st.lists(st.one_of(values, st.none()), min_size=n, max_size=n))
        columns[name] = pa.array(column, arrow_type)
        if arrow_type == pa.string() and draw(st.booleans()):
            columns[name] = columns[name].dictionary_encode()
    return pa.table(columns)


def test_a_parquet_file_of_any_schema_gives_pairs_or_a_named_error(folder, stories_tokenizer):
    """Binary, integer, NaN, timestamp, decimal, struct, list and map columns where text is expected."""

    @settings(max_examples=examples(40))
    @given(table=parquet_tables(), gz=st.booleans(), skip=st.booleans())
    def check(table, gz, skip):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        raw = sink.getvalue().to_pybytes()
        kind = "parquet.gz" if gz else "parquet"
        cfg = data_config(write(folder, kind, gzip.compress(raw) if gz else raw), on_bad_row="skip" if skip else "error")
        result = prepare(cfg, stories_tokenizer)
        if not isinstance(result, DataError):
            check_prepared(result, cfg, stories_tokenizer)

    check()


def _dicts(value) -> list[dict]:
    """Every JSON object inside ``value``, itself included."""
    if isinstance(value, dict):
        return [value, *(d for v in value.values() for d in _dicts(v))]
    if isinstance(value, list):
        return [d for v in value for d in _dicts(v)]
    return []


def _dumps(value, twice: dict | None) -> str:
    """JSON text of ``value`` where the object ``twice`` has its first key written twice."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_dumps(v, twice)}" for k, v in value.items()]
        if value is twice:
            items.insert(0, f"{json.dumps(next(iter(value)))}: 0")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dumps(v, twice) for v in value) + "]"
    return json.dumps(value)


def _token_drops(result) -> dict[str, int]:
    return {k: v for k, v in result.summary.dropped.items() if not k.startswith("bad row")}


# ------------------------------------------------------------------------------------------------
# Regressions: the minimal example of each bug the generated data found


def test_lone_surrogate_in_a_json_escape_is_a_named_bad_row(folder, stories_tokenizer):
    """Was a UnicodeEncodeError from inside Arrow (a TypeError from inside the tokenizer)."""
    path = write(folder, "jsonl", _jsonl(GOOD, '{"prompt": "a\\ud800", "chosen": "x", "rejected": "y"}'))
    err = prepare(data_config(path), stories_tokenizer)
    assert isinstance(err, DataError)
    assert str(err).endswith("line 2: field 'prompt': not valid Unicode: lone surrogate '\\ud800' at character 1")
    skipped = prepare(data_config(path, on_bad_row="skip"), stories_tokenizer)
    assert skipped.summary.dropped == {"bad row: invalid unicode": 1}


def test_json_nested_too_deeply_is_a_named_bad_row(folder, stories_tokenizer):
    """Was a RecursionError from inside json."""
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    err = prepare(data_config(write(folder, "jsonl", _jsonl(GOOD, deep))), stories_tokenizer)
    assert str(err).endswith("line 2: malformed JSON: nested too deeply to parse")
    err = prepare(data_config(write(folder, "json", ("[" + deep + "]").encode())), stories_tokenizer)
    assert str(err).endswith(".json: malformed JSON: nested too deeply to parse")


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_a_duplicate_key_is_a_named_bad_row_not_the_last_value(kind, folder, stories_tokenizer):
    """Was silently the last value (json.loads keeps it): the pair trained on one of two answers."""
    dup = '{"prompt": "a", "chosen": "x", "chosen": "y", "rejected": "z"}'
    nested = '{"prompt": [{"role": "user", "content": "a", "content": "b"}], ' \
             '"chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}'
    for row, field in ((dup, "chosen"), (nested, "prompt[0].content")):
        data = _jsonl(GOOD, row) if kind == "jsonl" else f"[{json.dumps(GOOD)}, {row}]".encode()
        path = write(folder, kind, data)
        err = prepare(data_config(path, format="auto"), stories_tokenizer)
        assert row_error(err) == (2, field), str(err)
        assert "duplicate key" in str(err)
        skipped = prepare(data_config(path, on_bad_row="skip"), stories_tokenizer)
        assert skipped.summary.dropped == {"bad row: duplicate key": 1}


def test_a_damaged_gzip_stream_is_a_data_error(folder, stories_tokenizer):
    """Was a zlib.error from inside gzip (only a cut stream, EOFError, was caught)."""
    raw = bytearray(gzip.compress(_jsonl(*[GOOD] * 200), mtime=0))
    raw[30:40] = b"\xff" * 10
    err = prepare(data_config(write(folder, "jsonl.gz", bytes(raw))), stories_tokenizer)
    assert "jsonl.gz: cannot read: Error -3 while decompressing data" in str(err)


def test_csv_fields_over_128_kib_are_read(folder, stories_tokenizer):
    """Was 'malformed CSV: field larger than field limit (131072)' for a valid long response."""
    path = write(folder, "csv", encode_file("csv", [{"prompt": "Hi", "chosen": "y" * 200_000, "rejected": "n"}]))
    result = prepare(data_config(path), stories_tokenizer)
    assert not isinstance(result, DataError), result
    assert result.summary.lengths["chosen"].max > 10_000
    import csv

    assert csv.field_size_limit() == 131072  # the reader restores the module-wide limit


def test_a_csv_row_with_the_wrong_number_of_fields_is_a_named_bad_row(folder, stories_tokenizer):
    """More fields than the header was a TypeError (a None key, sorted with the names); fewer was
    read as a pair with the missing fields silently None or an extra one silently dropped."""
    for line, fields in ((b"a,b,c,d", 4), (b"a,b", 2)):
        path = write(folder, "csv", b"prompt,chosen,rejected\r\nHi,yes,no\r\n" + line + b"\r\n")
        err = prepare(data_config(path), stories_tokenizer)
        assert str(err).endswith(f"row 2: {fields} fields, but the header has 3"), str(err)
        skipped = prepare(data_config(path, on_bad_row="skip"), stories_tokenizer)
        assert skipped.summary.dropped == {"bad row: wrong field count": 1}


def test_a_duplicate_column_is_a_one_line_data_error(folder, stories_tokenizer):
    """CSV: was silently the last column. Parquet: was Arrow's message listing the whole schema on several lines."""
    err = prepare(data_config(write(folder, "csv", b"prompt,chosen,chosen,rejected\r\na,b,c,d\r\n")), stories_tokenizer)
    assert str(err).endswith("csv: the header names column(s) 'chosen' more than once")
    table = pa.table([pa.array(["a"]), pa.array(["b"]), pa.array(["c"]), pa.array(["d"])],
                     names=["prompt", "chosen", "chosen", "rejected"])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    err = prepare(data_config(write(folder, "parquet", sink.getvalue().to_pybytes())), stories_tokenizer)
    assert str(err).endswith("parquet: the Parquet schema has column 'chosen' more than once")


def test_arrow_errors_are_one_line(folder, stories_tokenizer):
    """Was 'Couldn't deserialize thrift: ...\\nDeserializing page header failed.' on two lines."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["a"] * 50, "chosen": ["b"] * 50, "rejected": ["c"] * 50}), sink)
    raw = b"\xef\xbb\xbf" + sink.getvalue().to_pybytes()  # a BOM where no text file would have one
    err = prepare(data_config(write(folder, "parquet", raw)), stories_tokenizer)
    assert isinstance(err, DataError) and "cannot read Parquet" in str(err)  # check_error: one line


def test_a_parquet_string_that_is_not_utf8_is_a_data_error(folder, stories_tokenizer):
    """Was a UnicodeDecodeError from inside Arrow's to_pylist (a byte overwritten in a data page)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["MARKER"], "rejected": ["b"]}), sink, compression="none")
    raw = bytearray(sink.getvalue().to_pybytes())
    raw[raw.index(b"MARKER")] = 0x80
    err = prepare(data_config(write(folder, "parquet", bytes(raw))), stories_tokenizer)
    assert "parquet: cannot read Parquet: 'utf-8' codec can't decode byte 0x80" in str(err)


def test_an_eval_fraction_that_leaves_no_training_pair_names_the_file(folder, stories_tokenizer):
    """Was 'eval_fraction 0.5 of 1 pairs leaves no training pairs', without the file."""
    path = write(folder, "jsonl", encode_file("jsonl", [GOOD]))
    err = prepare(data_config(path, eval_fraction=0.5), stories_tokenizer)
    assert str(err) == f"{path}: eval_fraction 0.5 of 1 pairs leaves no training pairs"


def test_no_pair_left_after_tokenization_is_a_data_error(folder, stories_tokenizer):
    """Was an empty training set (the training loop then waits forever for a batch) or an empty
    eval set (NaN eval metrics)."""
    rows = [{"prompt": "p " * 100, "chosen": "x", "rejected": "y"}]
    err = prepare(data_config(write(folder, "jsonl", encode_file("jsonl", rows)), min_response_tokens=20),
                  stories_tokenizer)
    assert str(err).endswith("no training pair left after tokenization (dropped response_too_short: 1; "
                             f"data.max_length is {MAX_LENGTH}, data.min_response_tokens 20)")
    train = write(folder, "jsonl", encode_file("jsonl", [GOOD]))
    eval_ = write(folder, "jsonl", encode_file("jsonl", [{"prompt": "Hi", "chosen": " a" * 60, "rejected": " a" * 61}]))
    err = prepare(data_config(train, eval=str(eval_)), stories_tokenizer)
    assert str(err) == f"{eval_}: no eval pair left after tokenization (dropped identical_tokens: 1; " \
                       f"data.max_length is {MAX_LENGTH}, data.min_response_tokens 1)"


def test_pairs_identical_after_truncation_are_dropped_and_counted(folder, stories_tokenizer):
    """Was kept: the model was asked to prefer a sequence over itself (a constant log 2 loss that
    counts against accuracy). Also what llama3's ``| trim`` makes of answers differing in spaces."""
    rows = [GOOD, {"prompt": "Hi", "chosen": " a" * 60 + " b", "rejected": " a" * 60 + " c"}]
    result = prepare(data_config(write(folder, "jsonl", encode_file("jsonl", rows))), stories_tokenizer)
    assert result.summary.dropped == {"identical_tokens": 1} and result.summary.kept == 1
    chat = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yes"}],
             "rejected": [{"role": "assistant", "content": "Yes "}]}, {
             "prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yes"}],
             "rejected": [{"role": "assistant", "content": "No"}]}]
    result = prepare(data_config(write(folder, "jsonl", encode_file("jsonl", chat))), stories_tokenizer, "llama3")
    assert result.summary.dropped == {"identical_tokens": 1} and result.summary.kept == 1


def test_parquet_rows_of_several_conversational_shapes(folder, stories_tokenizer):
    """Was 'field chosen_messages: expected a list of messages, got None' on row 2: Parquet gives
    every row every column, so a null must read as an absent key."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    rows = [
        {"chosen_messages": [*parts, {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}],
         "rejected_messages": [*parts, {"role": "assistant", "content": [{"type": "text", "text": "No"}]}]},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yes"}],
         "rejected": [{"role": "assistant", "content": "No"}]},
    ]
    result = prepare(data_config(write(folder, "parquet", encode_file("parquet", rows))), stories_tokenizer)
    assert not isinstance(result, DataError), result
    assert result.summary.pairs == 2


def test_malformed_lines_are_skipped_and_counted_under_skip(folder, stories_tokenizer):
    """A broken line is a bad row like any other: named under error, dropped and counted under skip."""
    path = write(folder, "jsonl", _jsonl(GOOD, "{'single': 'quotes'}", "[1, 2]", GOOD) + b'{"prompt": "cut sh')
    err = prepare(data_config(path), stories_tokenizer)
    assert str(err).startswith(f"{path} line 2: malformed JSON: Expecting property name")
    result = prepare(data_config(path, on_bad_row="skip"), stories_tokenizer)
    assert result.summary.dropped == {"bad row: malformed JSON": 2, "bad row: not an object": 1}
    assert result.summary.first_errors[2].startswith(f"{path} line 5: malformed JSON: Unterminated string")
    assert result.summary.first_errors[2].endswith("(the file ends inside this line: is it cut short?)")


def test_invalid_utf8_names_the_line(folder, stories_tokenizer):
    path = write(folder, "jsonl", _jsonl(GOOD, GOOD) + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    err = prepare(data_config(path), stories_tokenizer)
    assert str(err).startswith(f"{path}: not valid UTF-8 text (line 3: ")


def test_messages_never_echo_a_megabyte_of_the_row(folder, stories_tokenizer):
    """A key or role quoted in a message is cut to 120 characters."""
    row = {"conversations": [{"from": "x" * 2**20, "value": "Hi"}], "chosen": {"from": "gpt", "value": "a"},
           "rejected": {"from": "gpt", "value": "b"}}
    err = prepare(data_config(write(folder, "jsonl", encode_file("jsonl", [row]))), stories_tokenizer)
    assert "unknown role 'xxx" in str(err) and len(str(err)) < 400
    err = prepare(data_config(write(folder, "jsonl", encode_file("jsonl", [{"k" * 2**20: 1}]))), stories_tokenizer)
    assert "cannot tell the row format" in str(err) and len(str(err)) < 1000
