"""Where each pair came from, 16 bytes a pair: ``(source number, row index)`` as two numpy arrays.

A list of Python tuples costs ~100 bytes a pair (the list slot, the tuple, the row's int), and the
split and the mixture each make another one: at 200k pairs that was most of what `orpo preprocess`'s
peak memory still grew by. ``Refs`` reads like that list (``refs[k]`` is a tuple, iteration yields
tuples) so the checks and the summary need no change.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

# tuples are made this many at a time while iterating: never a list of them all
_CHUNK = 1 << 16


class Refs(Sequence[tuple[int, int]]):
    """``refs[k] = (source number, row index in that source)``, stored as int32 / int64 arrays."""

    __slots__ = ("source", "row")

    def __init__(self, source: np.ndarray, row: np.ndarray) -> None:
        self.source = np.asarray(source, dtype=np.int32)
        self.row = np.asarray(row, dtype=np.int64)

    @classmethod
    def of(cls, source: int, rows: Sequence[int]) -> Refs:
        """The rows ``rows`` (any int sequence: a list, an ``array('q')``) of source ``source``."""
        row = np.asarray(rows, dtype=np.int64)
        return cls(np.full(len(row), source, dtype=np.int32), row)

    @classmethod
    def empty(cls) -> Refs:
        return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.row)

    @overload
    def __getitem__(self, k: int) -> tuple[int, int]: ...

    @overload
    def __getitem__(self, k: slice) -> Refs: ...

    def __getitem__(self, k: int | slice) -> tuple[int, int] | Refs:
        if isinstance(k, slice):
            return Refs(self.source[k], self.row[k])
        return int(self.source[k]), int(self.row[k])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for start in range(0, len(self), _CHUNK):
            yield from zip(self.source[start:start + _CHUNK].tolist(), self.row[start:start + _CHUNK].tolist(),
                           strict=True)

    def __add__(self, other: Refs) -> Refs:
        return Refs(np.concatenate([self.source, other.source]), np.concatenate([self.row, other.row]))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Refs):
            return bool(np.array_equal(self.source, other.source) and np.array_equal(self.row, other.row))
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def select(self, positions: Sequence[int]) -> Refs:
        at = np.asarray(positions, dtype=np.int64)
        return Refs(self.source[at], self.row[at])

    def __repr__(self) -> str:
        return f"Refs({len(self)} pairs)"
