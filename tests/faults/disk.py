"""A disk that fills up, for tests: ``open()`` for writing fails with ENOSPC once a byte budget is spent.

``FullDisk`` patches ``open`` (``builtins.open`` and ``io.open``, which ``pathlib`` calls), so every
Python-level write goes through it: torch.distributed.checkpoint's files, ``torch.save`` through
``write_atomic``, tokenizer files, the model card, ``datasets.save_to_disk``. A write that does not pass
the budget writes what fits, then raises ``OSError(ENOSPC)`` as the kernel would. Writes from native
code that opens its own files (safetensors' Rust writer) are not seen. A real small tmpfs is better
where one can be mounted (``tests/faults/run.py`` tries one first).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from typing import Any

_REAL_OPEN = io.open


class FullDisk:
    """``with FullDisk(after_bytes=N, match="step-4"):`` writes to paths containing ``match`` get N bytes in all."""

    def __init__(self, after_bytes: int = 0, match: str | None = None, error: int = errno.ENOSPC):
        self.after_bytes, self.match, self.error = after_bytes, match, error
        self.written = 0
        self.failed: list[str] = []  # the files a write failed in

    def __enter__(self) -> FullDisk:
        builtins.open = io.open = self._open  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        builtins.open = io.open = _REAL_OPEN

    def _open(self, file, mode="r", *args, **kwargs):
        f = _REAL_OPEN(file, mode, *args, **kwargs)
        # a descriptor (write_atomic opens with O_NOFOLLOW first): its path, as the kernel knows it
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fsdecode(file)
        writing = any(c in mode for c in "wax+")
        if not writing or (self.match is not None and self.match not in name):
            return f
        return _Limited(f, self, name)


class _Limited:
    """A file object whose writes spend the disk's budget."""

    def __init__(self, f, disk: FullDisk, name: str):
        self._f, self._disk, self._name = f, disk, name

    def write(self, data):
        n = memoryview(data).nbytes if not isinstance(data, str) else len(data.encode())
        room = self._disk.after_bytes - self._disk.written
        if n > room:
            if room > 0:
                self._f.write(data[:room])
                self._disk.written += room
            self._disk.failed.append(self._name)
            raise OSError(self._disk.error, os.strerror(self._disk.error), self._name)
        self._disk.written += n
        return self._f.write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __iter__(self):
        return iter(self._f)
