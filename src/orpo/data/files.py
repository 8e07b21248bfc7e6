"""Read a local data file: JSON Lines, CSV and Parquet as streams, rows parsed as they are used.

A file of any size costs the reader a line (or a batch of a Parquet row group) at a time and an
index of where each row is (JSON Lines: 16 bytes a row), never a list of every row; a .json list
and a gzipped .parquet are read whole (neither can be read in pieces). Messages name rows as
``sources.RowSource`` does: ``train.jsonl line 17``, ``data.csv row 5``.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import gzip
import itertools
import json
import re
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

from orpo.data.sources import (
    READERS_BY_SUFFIX,
    DataError,
    LazyRows,
    RowSource,
    UnreadableRow,
    clip,
    data_suffix,
    decode_text,
)


def read_file(path: Path, name: str | None = None) -> RowSource:
    """Read a local data file; ``name`` is how messages refer to it (default: the path).

    JSON Lines and CSV are read a line at a time from the (possibly gzip) stream as they are used
    (``JsonlRows``, ``CsvRows``), Parquet a batch of a row group at a time (``ParquetRows``):
    never all rows at once. A .json list and a gzipped .parquet are read whole.
    """
    name = name or str(path)
    suffix = data_suffix(path.name)
    if suffix is None:
        raise DataError(
            f"{name}: unknown file type; expected one of {', '.join(READERS_BY_SUFFIX)} (optionally .gz)"
        )
    try:
        if suffix == ".jsonl":
            rows = JsonlRows(path, name)
            return RowSource(name=name, rows=rows, line_numbers=rows.line_numbers)
        if suffix == ".csv":
            return RowSource(name=name, rows=CsvRows(path, name))
        if suffix == ".parquet" and path.suffix.lower() != ".gz":
            return RowSource(name=name, rows=ParquetRows(path, name))
        raw = _read_bytes(path)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a damaged stream is zlib's
        raise DataError(f"{name}: cannot read: {err}") from err
    return _READERS[suffix](raw, name)


def _open_bytes(path: Path) -> BinaryIO:
    return cast(BinaryIO, gzip.open(path, "rb")) if path.suffix.lower() == ".gz" else path.open("rb")


def _read_bytes(path: Path) -> bytes:
    with _open_bytes(path) as f:
        return f.read()


class _DuplicateKeyDict(dict):
    """A JSON object that had a key twice (``json`` keeps the last silently): which key."""

    duplicate: str


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    keys = [k for k, _ in pairs]
    marked = _DuplicateKeyDict(obj)
    marked.duplicate = next(k for i, k in enumerate(keys) if k in keys[:i])
    return marked


def _parse_json(text: str) -> Any:
    """``json.loads`` that marks objects with a duplicate key (see ``_duplicate_key``)."""
    return json.loads(text, object_pairs_hook=_object)


def _duplicate_key(row: dict[str, Any]) -> str | None:
    """The path of the first key given twice anywhere in ``row`` (``prompt[1].content``), or None."""
    stack: list[tuple[Any, str]] = [(row, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _DuplicateKeyDict):
            return f"{path}.{_key(value.duplicate)}" if path else _key(value.duplicate)
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{_key(k)}" if path else _key(k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


def _key(key: str) -> str:
    """A key as a message can show it: quoted when it holds control characters or lone surrogates."""
    return key if key.isprintable() else ascii(key)


def _row(value: Any) -> dict[str, Any] | UnreadableRow:
    if not isinstance(value, dict):
        return UnreadableRow(f"expected a JSON object, got {type(value).__name__}", "not an object")
    duplicate = _duplicate_key(value)
    if duplicate is not None:
        return UnreadableRow("duplicate key: given twice, JSON would keep only the last value", "duplicate key",
                             field=clip(duplicate))
    return value


def _jsonl_lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, str, bytes, int]]:
    """(line number, text, bytes, byte position in the stream) of each non-blank line, UTF-8 checked."""
    offset = 0  # bytes before this line, as the whole file's decode counts them (after a BOM)
    position = 0
    # binary lines end at b"\n" only: str.splitlines() would also break at U+2028 inside JSON strings
    for line_no, data in enumerate(stream, start=1):
        start, size = position, len(data)
        position += size
        if line_no == 1 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        line = _decode_line(data, name, line_no, offset)
        offset += len(data)
        if line.strip():
            yield line_no, line, data, start


def _jsonl_row(line: str, data: bytes) -> dict[str, Any] | UnreadableRow:
    try:
        return _row(_parse_json(line))
    except json.JSONDecodeError as err:
        cut = " (the file ends inside this line: is it cut short?)" if not data.endswith(b"\n") else ""
        return UnreadableRow(f"malformed JSON: {err}{cut}", "malformed JSON")
    except RecursionError:
        return UnreadableRow("malformed JSON: nested too deeply to parse", "malformed JSON")


class JsonlRows(LazyRows[dict[str, Any] | UnreadableRow]):
    """A JSON Lines file's rows, parsed as they are read: every pass streams the (gzip) file again,
    so no list of every row is ever held. Opening scans it once (UTF-8 checked, blank lines
    skipped) for each row's line number and byte position: 16 bytes a row."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.line_numbers, self._positions = array("q"), array("q")
        with _open_bytes(path) as stream:
            for line_no, _, _, position in _jsonl_lines(stream, name):
                self.line_numbers.append(line_no)
                self._positions.append(position)

    def __len__(self) -> int:
        return len(self.line_numbers)

    def row(self, i: int) -> dict[str, Any] | UnreadableRow:
        position = self._positions[i]
        with _open_bytes(self.path) as stream:
            stream.seek(position)
            data = stream.readline()
        if position == 0 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        return _jsonl_row(data.decode("utf-8"), data)

    def __iter__(self) -> Iterator[dict[str, Any] | UnreadableRow]:
        with _open_bytes(self.path) as stream:
            lines = _jsonl_lines(stream, self.name)
            yield from self.counted((_jsonl_row(line, data) for _, line, data, _ in lines), self.name)


def _decode_line(data: bytes, name: str, line_no: int, offset: int) -> str:
    """One line's text; not UTF-8 is the message ``decode_text`` gives for the whole file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        start, end = err.start + offset, err.end + offset
        what = (f"byte 0x{data[err.start]:02x} in position {start}" if err.end == err.start + 1
                else f"bytes in position {start}-{end - 1}")
        raise DataError(f"{name}: not valid UTF-8 text (line {line_no}: 'utf-8' codec can't decode {what}: "
                        f"{err.reason})") from err


def _read_json(raw: bytes, name: str) -> RowSource:
    try:
        data = _parse_json(decode_text(raw, name))
    except json.JSONDecodeError as err:
        raise DataError(f"{name}: malformed JSON: {err}") from err
    except RecursionError as err:
        raise DataError(f"{name}: malformed JSON: nested too deeply to parse") from err
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a top-level JSON list of rows, got {type(data).__name__} "
            "(for one object per line, use a .jsonl file)"
        )
    return RowSource(name=name, rows=[_row(row) for row in data])


class CsvRows(LazyRows[dict[str, Any] | UnreadableRow]):
    """A CSV file's rows, parsed as they are used: every pass streams the (gzip) file again, so no
    list of every row is held. Opening parses it once, to check it (UTF-8, the header, quoting)
    and count its rows; a row is named by its 1-based number among the rows (blank lines skipped).
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._count = sum(1 for _ in self._records())

    def _records(self) -> Iterator[dict[str, Any] | UnreadableRow]:
        with _open_bytes(self.path) as stream:
            yield from _csv_rows(_text_lines(stream, self.name), self.name)

    def __len__(self) -> int:
        return self._count

    def row(self, i: int) -> dict[str, Any] | UnreadableRow:
        return next(itertools.islice(self._records(), i, None))

    def __iter__(self) -> Iterator[dict[str, Any] | UnreadableRow]:
        return self.counted(self._records(), self.name)


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")


def _text_lines(stream: BinaryIO, name: str) -> Iterator[str]:
    """A text file's lines as ``io.StringIO(text, newline="")`` gives them (``\n``, ``\r\n`` and a
    lone ``\r`` end a line, kept), decoded a line at a time with ``decode_text``'s message."""
    offset = 0
    for line_no, data in enumerate(stream, start=1):
        if line_no == 1 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        text = _decode_line(data, name, line_no, offset)
        offset += len(data)
        yield from (piece for piece in _LONE_CR.split(text) if piece)


def _csv_rows(lines: Iterator[str], name: str) -> Iterator[dict[str, Any] | UnreadableRow]:
    """The rows under the header of CSV ``lines``: a dict each, or an ``UnreadableRow`` of the wrong width."""
    reader = csv.reader(lines)
    header = _csv_record(reader, name) or []
    duplicates = [repr(c) for c, n in Counter(header).items() if n > 1]
    if duplicates:
        raise DataError(f"{name}: the header names column(s) {clip(', '.join(duplicates))} more than once")
    while (fields := _csv_record(reader, name)) is not None:
        if not fields:
            continue  # a blank line, as csv.DictReader skips it
        if len(fields) != len(header):
            yield UnreadableRow(f"{len(fields)} fields, but the header has {len(header)}", "wrong field count")
        else:
            yield dict(zip(header, fields, strict=True))


def _csv_record(reader, name: str) -> list[str] | None:
    """The next record, or None at the end; the field limit is raised for this call only (the
    default 128 KiB would refuse a long response; the limit is the process's, not ours)."""
    old_limit = csv.field_size_limit(2**31 - 1)
    try:
        return next(reader, None)
    except csv.Error as err:
        raise DataError(f"{name} line {reader.line_num}: malformed CSV: {err}") from err
    finally:
        csv.field_size_limit(old_limit)


class ParquetRows(LazyRows[dict[str, Any]]):
    """A Parquet file's rows, read as they are used, ``BATCH`` rows of a row group at a time.

    Opening reads the footer only (the schema, checked for duplicate columns, and the row
    groups' sizes); a page that cannot be decoded is a ``DataError`` when it is reached.
    """

    BATCH = 1000

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        with _parquet_errors(name):
            file = self._open()
            duplicate = _duplicate_column(file.schema_arrow)
            sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        if duplicate is not None:
            raise DataError(f"{name}: the Parquet schema has column {clip(repr(duplicate))} more than once")
        self._starts = [0, *itertools.accumulate(sizes)]

    def _open(self):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path)

    def __len__(self) -> int:
        return self._starts[-1]

    def row(self, i: int) -> dict[str, Any]:
        group = bisect.bisect_right(self._starts, i) - 1
        with _parquet_errors(self.name):
            table = self._open().read_row_group(group)
        return table.slice(i - self._starts[group], 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with _parquet_errors(self.name):
            for batch in self._open().iter_batches(batch_size=self.BATCH):
                rows = batch.to_pylist()
                yield from rows


@contextmanager
def _parquet_errors(name: str) -> Iterator[None]:
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:  # a damaged string page fails to decode
        reason = " ".join(str(err).split())  # Arrow's messages can span lines
        raise DataError(f"{name}: cannot read Parquet: {reason}") from err


def _read_parquet(raw: bytes, name: str) -> RowSource:
    """A gzipped Parquet file, decompressed: read whole (Parquet compresses its own pages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _parquet_errors(name):
        file = pq.ParquetFile(pa.BufferReader(raw))
        # checked before reading: Arrow refuses a duplicate column with a message listing the whole schema
        duplicate = _duplicate_column(file.schema_arrow)
        rows = file.read().to_pylist() if duplicate is None else []
    if duplicate is not None:
        raise DataError(f"{name}: the Parquet schema has column {clip(repr(duplicate))} more than once")
    return RowSource(name=name, rows=list(rows))


def _duplicate_column(schema) -> str | None:
    """The path of a field name given twice in ``schema`` (top level or inside a struct), or None."""
    import pyarrow as pa

    stack: list[tuple[list, str]] = [(list(schema), "")]
    while stack:
        fields, path = stack.pop()
        names = [f.name for f in fields]
        for f in fields:
            where = f"{path}.{f.name}" if path else f.name
            if names.count(f.name) > 1:
                return where
            t = f.type
            while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
                t = t.value_type
            if pa.types.is_struct(t):
                stack.append(([t.field(i) for i in range(t.num_fields)], where))
    return None


# what is read whole; the other files are read as streams (``read_file``)
_READERS: dict[str, Callable[[bytes, str], RowSource]] = {
    ".json": _read_json,
    ".parquet": _read_parquet,
}
