"""The progress file beside ``--out``: what a run has done so far, so a killed run goes on from there.

``OUT.progress`` starts with a header line (the arguments that decide the pairs); then one JSON line
per finished source row, appended and fsynced a batch at a time. A rerun with the same arguments
skips the rows it lists (no sample generated twice); other arguments are refused naming the flag.
A line cut short by a kill is dropped on reopening. orpo removes the file only after ``--out`` is
published, and only when its header says it wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orpo.config import ConfigError

HEADER_KEY = "orpo_pairs_progress"


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


class Progress:
    """The rows done (by source index) and an append handle for more."""

    def __init__(self, out: Path, arguments: dict[str, Any]) -> None:
        self.path = progress_path(out)
        self.done: dict[int, dict[str, Any]] = {}
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise ConfigError(f"{self.path}: not a regular file; orpo pairs keeps its progress there")
        # written with the first finished rows: a run that fails before any (a model that does not
        # load) leaves nothing behind
        self._header: str | None = json.dumps({HEADER_KEY: 1, "arguments": arguments}, ensure_ascii=False) + "\n"
        if self.path.exists() and self._read(arguments):
            self._header = None

    def _read(self, arguments: dict[str, Any]) -> bool:
        """Read the rows a run with the same arguments finished; False: the file held nothing whole."""
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):
            # the last line was cut by a kill: drop it (its row is generated again)
            whole = raw[: raw.rfind(b"\n") + 1]
            if not whole:
                prefix = json.dumps({HEADER_KEY: 1}).encode()[:-1]
                if not (raw.startswith(prefix) or prefix.startswith(raw)):
                    raise ConfigError(f"{self.path}: exists and is not an orpo pairs progress file; move it away")
                # a header cut short: nothing was finished
                self.path.unlink()
                return False
            raw = whole
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        lines = raw.decode("utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
        if not isinstance(header, dict) or header.get(HEADER_KEY) != 1:
            raise ConfigError(f"{self.path}: exists and is not an orpo pairs progress file; move it away")
        before = header.get("arguments", {})
        for key in sorted(set(before) | set(arguments)):
            if before.get(key) != arguments.get(key):
                raise ConfigError(f"{self.path}: an interrupted run with {key} {before.get(key)!r}, now "
                                  f"{arguments.get(key)!r}: rerun with the same arguments, or remove the file "
                                  "to start again")
        for line in lines[1:]:
            entry = json.loads(line)
            self.done[int(entry["row"])] = entry
        return True

    def add(self, entries: list[dict[str, Any]]) -> None:
        """Record finished rows durably (one write + fsync for the batch)."""
        if entries:
            self._append((self._header or "") + "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
            self._header = None
            for e in entries:
                self.done[int(e["row"])] = e

    def _append(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
