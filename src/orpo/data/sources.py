"""Where preference rows come from: a local file (``files.read_file``), a hub dataset, or memory.

Local files keep their physical line numbers (JSON Lines) or row numbers so that every later
error can say exactly where the bad row is: ``train.jsonl line 17``, ``data.json row 5``.

A row that cannot be read as a mapping (a malformed JSON line, a duplicate key, a CSV row with
the wrong number of fields) keeps its place as an ``UnreadableRow``, so ``normalize`` stops at it
or skips and counts it like any other bad row (``data.on_bad_row``). A problem with the file as
a whole (not UTF-8, a damaged gzip stream or Parquet file, a duplicate column) is a ``DataError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

READERS_BY_SUFFIX = (".jsonl", ".json", ".parquet", ".csv")
T = TypeVar("T")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """Any problem with the data itself: unreadable file, malformed row, unknown format."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A local data path that does not exist (both a DataError and a FileNotFoundError)."""


@dataclass(frozen=True)
class UnreadableRow:
    """A row the reader could not turn into a mapping; ``field`` names the key at fault, if one is."""

    reason: str
    kind: str  # what skipped rows are counted by
    field: str | None = None


@dataclass
class RowSource:
    """Rows read from one source, plus how to point at each of them in messages."""

    name: str
    rows: Sequence[dict[str, Any] | UnreadableRow]  # a list, or ArrowRows over a datasets.Dataset
    line_numbers: Sequence[int] | None = None  # physical 1-based lines, for JSON Lines only
    index: Sequence[Any] | None = None  # in-memory rows: the caller's own index (list position, DataFrame label)

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

    def without_rows(self) -> RowSource:
        """This source for naming rows only (``where``, ``number``): its rows let go once normalized."""
        return RowSource(name=self.name, rows=[], line_numbers=self.line_numbers, index=self.index)


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, for quoting a row's own text (a key, a role) in a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rows_from_memory(data: Any, name: str) -> RowSource:
    """Rows given in Python: a ``datasets.Dataset``, a pandas DataFrame or a list of dicts.

    Rows are named by their index in messages (``train_data row 7``): the list position, the
    Dataset row, or the DataFrame's index label. pandas' missing values (NaN) become None and
    NumPy arrays (list columns read through pandas) become lists, so a row means what it would in
    a JSON file.
    """
    kind = f"{type(data).__module__}.{type(data).__name__}"
    rows: Sequence[Any]
    if kind.startswith("datasets.") and hasattr(data, "keys") and not hasattr(data, "to_list"):
        raise DataError(f"{name}: a DatasetDict with splits {sorted(data.keys())}; pass one split, e.g. "
                        f"{name}=ds[{next(iter(data.keys()), 'train')!r}]")
    if kind.startswith("datasets.") and hasattr(data, "to_list"):
        rows, index = ArrowRows(data), None
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


class LazyRows(Sequence[T]):
    """A sequence read from storage as it is used (a file, an Arrow table): subclasses give
    ``__len__``, ``__iter__`` (one pass) and ``row(i)`` for ``0 <= i < len``; indexing (negative
    indices, slices, ``IndexError``) is as a list's."""

    def row(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self.row(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.row(i)

    def counted(self, rows: Iterable[T], name: str) -> Iterator[T]:
        """``rows`` (a pass over the file), refusing a file whose row count changed since it was opened."""
        count = 0
        for item in rows:
            count += 1
            yield item
        if count != len(self):
            raise DataError(f"{name}: changed while it was read ({len(self)} rows, then {count})")


class ArrowRows(LazyRows[dict[str, Any]]):
    """A ``datasets.Dataset``'s rows as a sequence of dicts, read from its (memory-mapped) Arrow table a
    batch at a time: never a Python list of every row."""

    def __init__(self, dataset: Any, batch_size: int = 1000) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int) -> dict[str, Any]:
        return self.dataset[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), self.batch_size):
            batch = self.dataset[start:start + self.batch_size]
            yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))


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
    from orpo.data.files import read_file

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
    return RowSource(name=f"{name}:{split}", rows=ArrowRows(dataset))


def data_suffix(spec: str) -> str | None:
    """The reader suffix of a file name (``.gz`` looked through), or None if unknown."""
    suffixes = [s.lower() for s in Path(spec).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in READERS_BY_SUFFIX:
        return suffixes[-1]
    return None


def decode_text(raw: bytes, name: str) -> str:
    """The text of a data file's bytes (a byte-order mark dropped, common in exported CSV/JSON).

    Not UTF-8 is a ``DataError`` naming the file, the line and the byte offset ("in position N"),
    for every text file the data settings name (``data.general_eval`` too).
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{name}: not valid UTF-8 text (line {line}: {err})") from err
