"""Read preference rows from a local file or a Hugging Face hub dataset.

Local files keep their physical line numbers (JSON Lines) or row numbers so that every later
error can say exactly where the bad row is: ``train.jsonl line 17``, ``data.json row 5``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READERS_BY_SUFFIX = (".jsonl", ".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """Any problem with the data itself: unreadable file, malformed row, unknown format."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A local data path that does not exist (both a DataError and a FileNotFoundError)."""


@dataclass
class RowSource:
    """Rows read from one source, plus how to point at each of them in messages."""

    name: str
    rows: list[dict[str, Any]]
    line_numbers: list[int] | None = None  # physical 1-based lines, for JSON Lines only
    index: list[Any] | None = None  # in-memory rows: the caller's own index (list position, DataFrame label)

    def where(self, i: int) -> str:
        """Name row ``i`` (0-based) for a message: ``name line N`` or ``name row N`` (N: ``number(i)``)."""
        return f"{self.name} {'line' if self.line_numbers is not None else 'row'} {self.number(i)}"

    @property
    def numbering(self) -> str:
        """What ``number`` gives: ``line`` (JSON Lines), ``row`` (1-based) or ``index`` (in memory)."""
        if self.line_numbers is not None:
            return "line"
        return "index" if self.index is not None else "row"

    def number(self, i: int) -> Any:
        """How a user finds row ``i`` (0-based): its file line, 1-based row, or in-memory index."""
        if self.line_numbers is not None:
            return self.line_numbers[i]
        if self.index is not None:
            return self.index[i]
        return i + 1

    def __len__(self) -> int:
        return len(self.rows)


def rows_from_memory(data: Any, name: str) -> RowSource:
    """Rows given in Python: a ``datasets.Dataset``, a pandas DataFrame or a list of dicts.

    Rows are named by their index in messages (``train_data row 7``): the list position, the
    Dataset row, or the DataFrame's index label. pandas' missing values (NaN) become None and
    NumPy arrays (list columns read through pandas) become lists, so a row means what it would in
    a JSON file.
    """
    kind = f"{type(data).__module__}.{type(data).__name__}"
    if kind.startswith("datasets.") and hasattr(data, "keys") and not hasattr(data, "to_list"):
        raise DataError(f"{name}: a DatasetDict with splits {sorted(data.keys())}; pass one split, e.g. "
                        f"{name}=ds[{next(iter(data.keys()), 'train')!r}]")
    if kind.startswith("datasets.") and hasattr(data, "to_list"):
        rows, index = data.to_list(), None
    elif kind.startswith("pandas.") and hasattr(data, "to_dict"):
        if not hasattr(data, "columns"):
            raise DataError(f"{name}: a pandas {type(data).__name__}; pass a DataFrame (one row per pair)")
        rows, index = data.to_dict(orient="records"), list(data.index)
        rows = [{k: _plain(v) for k, v in row.items()} for row in rows]
    elif isinstance(data, list | tuple):
        rows, index = list(data), None
    else:
        raise DataError(f"{name}: expected a datasets.Dataset, a pandas DataFrame or a list of dicts, got {kind}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{name} row {index[i] if index else i}: expected a dict, got {type(row).__name__}")
    return RowSource(name=name, rows=rows, index=index if index is not None else list(range(len(rows))))


def _plain(value: Any) -> Any:
    """A pandas cell as JSON would have it: NaN -> None, NumPy arrays/scalars -> lists/Python values."""
    if isinstance(value, float) and value != value:
        return None
    tolist = getattr(value, "tolist", None)
    if tolist is not None and type(value).__module__ == "numpy":
        value = tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load_rows(spec: str, split: str = "train", subset: str | None = None) -> RowSource:
    """Read ``spec``: an existing local file, else a hub dataset ``org/name`` or ``org/name:split``.

    A spec that looks like a path (known extension, or starting with ``./``, ``../``, ``/``, ``~``)
    but does not exist is an error; it is never sent to the hub.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return read_file(path, name=spec)
    if path.is_dir():
        raise DataError(f"{spec}: is a directory; give a .jsonl/.json/.parquet/.csv file (optionally .gz)")
    if looks_like_path(spec):
        raise DataFileNotFoundError(f"{spec}: no such file")
    hub = parse_hub_spec(spec, split)
    if hub is None:
        raise DataError(
            f"{spec!r} is neither an existing file nor a hub dataset name 'org/name' (or 'org/name:split')"
        )
    return load_hub(*hub, subset=subset)


def looks_like_path(spec: str) -> bool:
    """True for specs that can only mean a local file (known data extension or explicit path)."""
    return spec.startswith(("./", "../", "/", "~")) or data_suffix(spec) is not None


def parse_hub_spec(spec: str, split: str = "train") -> tuple[str, str] | None:
    """``org/name[:split]`` -> ``(name, split)``; the ``:split`` part overrides ``split``.

    Returns None when ``spec`` is not shaped like a hub dataset name.
    """
    name, sep, explicit_split = spec.partition(":")
    if not _HUB_NAME.match(name) or (sep and not explicit_split):
        return None
    return name, explicit_split or split


def load_hub(name: str, split: str, subset: str | None = None) -> RowSource:
    """Load one split of a hub dataset with ``datasets`` (honours HF_DATASETS_OFFLINE and the cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot load hub dataset {name!r} (subset {subset!r}, split {split!r}): {err}"
        ) from err
    return RowSource(name=f"{name}:{split}", rows=dataset.to_list())


def data_suffix(spec: str) -> str | None:
    """The reader suffix of a file name (``.gz`` looked through), or None if unknown."""
    suffixes = [s.lower() for s in Path(spec).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in READERS_BY_SUFFIX:
        return suffixes[-1]
    return None


def read_file(path: Path, name: str | None = None) -> RowSource:
    """Read a local data file; ``name`` is how messages refer to it (default: the path)."""
    name = name or str(path)
    suffix = data_suffix(path.name)
    if suffix is None:
        raise DataError(
            f"{name}: unknown file type; expected one of {', '.join(READERS_BY_SUFFIX)} (optionally .gz)"
        )
    try:
        raw = _read_bytes(path)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{name}: cannot read: {err}") from err
    return _READERS[suffix](raw, name)


def _read_bytes(path: Path) -> bytes:
    if path.suffix.lower() == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark, common in exported CSV/JSON
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not valid UTF-8 text ({err})") from err


def _read_jsonl(raw: bytes, name: str) -> RowSource:
    rows: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    # split on "\n" only: str.splitlines() would also break at U+2028 inside JSON strings
    for line_no, line in enumerate(_decode(raw, name).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name} line {line_no}: malformed JSON: {err}") from err
        if not isinstance(row, dict):
            raise DataError(f"{name} line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        line_numbers.append(line_no)
    return RowSource(name=name, rows=rows, line_numbers=line_numbers)


def _read_json(raw: bytes, name: str) -> RowSource:
    try:
        data = json.loads(_decode(raw, name))
    except json.JSONDecodeError as err:
        raise DataError(f"{name}: malformed JSON: {err}") from err
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a top-level JSON list of rows, got {type(data).__name__} "
            "(for one object per line, use a .jsonl file)"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{name} row {i + 1}: expected a JSON object, got {type(row).__name__}")
    return RowSource(name=name, rows=data)


def _read_csv(raw: bytes, name: str) -> RowSource:
    try:
        rows = list(csv.DictReader(io.StringIO(_decode(raw, name), newline="")))
    except csv.Error as err:
        raise DataError(f"{name}: malformed CSV: {err}") from err
    return RowSource(name=name, rows=rows)


def _read_parquet(raw: bytes, name: str) -> RowSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{name}: cannot read Parquet: {err}") from err
    return RowSource(name=name, rows=table.to_pylist())


_READERS: dict[str, Callable[[bytes, str], RowSource]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
