"""Every rule about the user's disk, in one place: orpo deletes or replaces only what it made.

- **Ownership.** A folder orpo writes into as a whole (a run's ``train.output_dir``, ``orpo merge
  OUT``, ``orpo report --out``, a sweep's folder) carries a marker, ``.orpo.json``, written when orpo
  creates or adopts it: what kind of folder it is, an id, and the names orpo wrote in it
  (``child``). orpo takes a folder that is new, empty, or marked as the same kind; a folder it did
  not make is refused however ``train.overwrite`` is set (a run written before the marker existed
  is recognised by its files and adopted). Removing a previous run removes only the names its
  marker lists. ``/`` and the home folder are always refused.
- **One lock per folder**, an OS lock (``flock``) held while a run lives and released by the kernel
  when the process dies, so a kill never leaves a stale lock; a second run exits 2 naming the
  holder.
- **No symlink is followed** inside an owned folder when writing, replacing or removing.
- **Durable writes**: ``write_atomic`` (a file) and ``atomic_dir`` (a folder) publish complete
  content or nothing; ``stop_on_write_error`` turns a full disk on any rank into one ``SaveFailed``.
- **Scratch folders** (the data cache's work and temporary folders) carry their host and process
  in their name (``scratch_name``); a later run removes those whose process died on this host.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orpo.config import ConfigError

MARKER = ".orpo.json"
LOCK = ".orpo.lock"
_OURS = (MARKER, LOCK)


class DiskError(ConfigError):
    """orpo refuses to touch a path (exit 2): not made by orpo, a symlink, a file, ``/`` or home."""


class SaveFailed(RuntimeError):
    """A checkpoint or model folder could not be written (disk full, I/O error); what was there is intact."""


def expand(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded, as a shell would (``output_dir: ~/run`` is not a folder named ``~``)."""
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))


def refuse_special(path: Path, what: str) -> None:
    """``/`` and the home folder are never a folder orpo owns, whatever is in them."""
    resolved = Path(path).resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise DiskError(f"{what}: {path} is {'the root folder' if resolved == Path(resolved.anchor) else 'your home folder'}; "
                        "orpo writes only into a folder of its own: pick a new one, such as runs/NAME")


def output_file(spec: str, what: str, ours: Callable[[dict[str, Any]], bool]) -> Path:
    """The JSON Lines file a command writes (``--out FILE.jsonl``), checked before anything runs.

    A file has no marker, so an existing one is replaced only if it is empty or its first row is one
    this command writes (``ours``); anything else, a link or a folder is refused, naming it."""
    path = expand(spec)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise DiskError(f"{what} {spec}: " + ("a folder: name a file" if path.is_dir() and not path.is_symlink()
                                             else "not a regular file; orpo never writes through a link"))
    if not path.parent.is_dir():
        raise DiskError(f"{what} {spec}: its folder {path.parent} does not exist")
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        try:
            row = json.loads(first)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not ours(row):
            raise DiskError(f"{what} {spec}: the file exists and orpo did not write it (its first line is not "
                            "one of this command's rows); orpo replaces only its own files: move it or pick "
                            "another name")
    return path


# ---------------------------------------------------------------------------------------------
# Ownership: the marker


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when there is none (a damaged one is not orpo's word either)."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("made"), list):
        return None
    return marker


def _new_marker(kind: str, made: list[str]) -> dict[str, Any]:
    return {"kind": kind, "id": uuid.uuid4().hex, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "made": made}


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    write_atomic(folder / MARKER, (json.dumps(marker, indent=1) + "\n").encode())


def inspect_folder(folder: Path, kind: str, what: str,
                   legacy: Callable[[Path, list[str]], bool] | None = None) -> dict[str, Any] | None:
    """Check, touching nothing, that orpo may take ``folder`` as a ``kind`` folder; return its marker
    (None when the folder is new or empty). ``legacy(folder, names)``: whether an unmarked folder is
    one of this kind written before markers existed, which ``claim`` adopts."""
    folder = Path(folder)
    refuse_special(folder, what)
    if folder.is_symlink() and not folder.is_dir():
        raise DiskError(f"{what}: {folder} is a broken symlink")
    if folder.exists() and not folder.is_dir():
        raise DiskError(f"{what}: {folder} is a file, not a folder")
    if not folder.exists():
        return None
    marker = read_marker(folder)
    entries = sorted(p.name for p in folder.iterdir() if p.name not in _OURS)
    if marker is not None:
        if marker.get("kind") != kind:
            raise DiskError(f"{what}: {folder} is an orpo {marker.get('kind')} folder, not a {kind} folder; "
                            "pick a new folder")
        return marker
    if not entries:
        return None
    if legacy is not None and legacy(folder, entries):
        return {"kind": kind, "made": entries, "adopted": True}
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise DiskError(f"{what}: {folder} is not empty and orpo did not make it (it holds {shown}); orpo writes "
                    "only into a new or empty folder or one it made: pick another")


def claim(folder: Path, kind: str, what: str,
          legacy: Callable[[Path, list[str]], bool] | None = None) -> dict[str, Any]:
    """Take ``folder`` as a ``kind`` folder (``inspect_folder``'s rules): create it with its marker,
    or adopt a pre-marker one, or accept one already marked. Returns the marker."""
    folder = Path(folder)
    marker = inspect_folder(folder, kind, what, legacy)
    if marker is not None and not marker.get("adopted"):
        return marker
    marker = _new_marker(kind, marker["made"] if marker else [])
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, marker)
    return marker


def child(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, for orpo to write: refused if it is a symlink, or if it exists and orpo did
    not make it; recorded in the marker as orpo's (main process only)."""
    folder = Path(folder)
    path = folder / name
    marker = read_marker(folder)
    if marker is None:
        raise DiskError(f"{what}: {folder} has no {MARKER}: orpo writes only into a folder it claimed")
    if path.is_symlink():
        raise DiskError(f"{what}: {path} is a symlink; orpo does not write through links in its folders: remove it")
    if name not in marker["made"]:
        if path.exists():
            raise DiskError(f"{what}: {path} exists and orpo did not make it; move it away first")
        marker["made"] = [*marker["made"], name]
        _write_marker(folder, marker)
    return path


@contextmanager
def publish_owned(folder: Path, kind: str, what: str,
                  legacy: Callable[[Path, list[str]], bool] | None = None) -> Iterator[Path]:
    """Write a whole ``kind`` folder (a merged model, a report) into a temporary folder and publish it
    with its marker in one rename (``atomic_dir``). An existing ``folder`` is replaced only when it is
    a marked ``kind`` folder holding nothing but what orpo made there."""
    folder = expand(folder).absolute()
    marker = inspect_folder(folder, kind, what, legacy)
    if marker is not None:
        extra = sorted(p.name for p in folder.iterdir() if p.name not in _OURS and p.name not in marker["made"])
        if extra:
            raise DiskError(f"{what}: {folder} also holds {', '.join(extra[:5])}, which orpo did not make; "
                            "move them away or pick another folder")
    with atomic_dir(folder) as tmp:
        yield tmp
        _write_marker(tmp, _new_marker(kind, sorted(p.name for p in tmp.iterdir() if p.name not in _OURS)))


def set_marker(folder: Path, **fields: Any) -> None:
    """Record facts about an owned folder in its marker (e.g. the step a run finished at)."""
    marker = read_marker(folder)
    if marker is not None:
        marker.update(fields)
        _write_marker(Path(folder), marker)


def remove_made(folder: Path) -> list[str]:
    """Remove what the marker says orpo made in ``folder`` (a symlink in its place: the link only), and
    forget it; everything else stays. Returns the names removed."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return []
    removed = []
    for name in marker["made"]:
        path = folder / name
        if "/" in name or name in ("", ".", "..") or name in _OURS or not (path.exists() or path.is_symlink()):
            continue
        remove_tree(path)
        removed.append(name)
    marker["made"], marker["finished_step"] = [], None
    _write_marker(folder, marker)
    return removed


def remove_tree(path: Path) -> None:
    """Remove an orpo-made folder; a symlink in its place is unlinked, its target never entered."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def scratch_name(kind: str, key: str) -> str:
    """A name for this process's scratch folder (``.KIND-KEY-HOST-PID-RANDOM``), one
    ``remove_stale_scratch`` can tell as orpo's and as left by a process that died."""
    return f".{kind}-{key}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_scratch(folder: Path, kind: str) -> list[str]:
    """Remove the ``scratch_name`` folders in ``folder`` whose process, on this host, is gone (a
    kill mid-write leaves them); those of live processes and of other hosts stay, as does any
    other name."""
    pattern = re.compile(rf"^\.{re.escape(kind)}-[0-9a-f]+-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or m["host"] != _HOST or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            remove_tree(entry)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------------------------------
# One run per folder: the lock


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.orpo.lock`` for as long as this object holds it.

    The kernel releases it when the process ends however it ends, so there is never a stale lock
    to clean up; the file keeps the holder's PID and host for the message a second run gets.
    """

    def __init__(self, folder: Path, what: str):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DiskError(f"{what}: {self.path} is a symlink; remove it") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(fd)
            raise DiskError(f"{what}: {folder} is in use by another orpo run ({holder}); wait for it to end, "
                            "or pick another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Durable writes


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent/old or complete, and on disk (fsynced) when this returns.

    The temporary file is created new (``O_EXCL | O_NOFOLLOW``), so a link planted under its name is
    never written through; the rename replaces a link at ``path`` itself, never its target.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        # name the file being written, not its temporary name, and leave nothing behind
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def append_text(path: Path, text: str) -> None:
    """Append to a log file orpo owns (``metrics.jsonl``, ``samples.jsonl``), never through a link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "a", encoding="utf-8") as f:
        f.write(text)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it to ``final`` (replacing it).

    ``os.rename`` within one directory is atomic, so readers see either the old folder or the new
    complete one. A failure removes the temporary folder and leaves ``final`` untouched. The caller
    has checked that ``final`` is orpo's to replace (``child``, ``claim``).
    """
    final = Path(final).absolute()
    if final.is_symlink():
        raise DiskError(f"{final} is a symlink; orpo does not replace what a link points to: remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    remove_tree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``; an existing ``final`` is replaced.

    On Linux an existing ``final`` is swapped with ``tmp`` by one ``renameat2(RENAME_EXCHANGE)``
    (kernel 3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs and most local filesystems), so every
    lookup of ``final`` finds the old folder or the new one, never nothing, and a crash leaves one
    of the two in place. Elsewhere (macOS, Windows, NFS and other filesystems without the call)
    the old folder is first renamed aside to ``.NAME.old``: for a moment ``final`` is missing, and
    a crash in that moment leaves the old folder under ``.NAME.old``. Neither way gives a reader a
    snapshot: one that opens ``final/a`` before and ``final/b`` after the swap gets one file of
    each version. And it orders names, not disk writes: nothing is fsynced, so after a power cut
    the files of a just-published folder may be incomplete.
    """
    if final.exists() and not final.is_symlink() and _exchange(tmp, final):
        shutil.rmtree(tmp)  # the old folder, now under the temporary name
        return
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old"
        remove_tree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        remove_tree(old)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # a C library without the wrapper (glibc before 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the kernel or this filesystem cannot exchange
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# ---------------------------------------------------------------------------------------------
# A write that fails


def _published_nothing(path: Path) -> str:
    return f"nothing new was published at {path}: free some space and run it again"


@contextmanager
def stop_on_write_error(what: str, path: Path, accelerator=None,
                        needed: Callable[[], tuple[int, str]] = lambda: (0, ""),
                        cleanup: Callable[[], None] | None = None,
                        next_step: Callable[[Path], str] = _published_nothing) -> Iterator[None]:
    """Run one phase of a save's writes; an ``OSError`` on any rank raises ``SaveFailed`` on every rank.

    Every rank leaves the block and then takes part in one collective (which is also the phase's
    barrier), so no rank waits forever in a later collective for one that failed. The block itself
    may hold no collective but ``torch.distributed.checkpoint``'s own, which fails on every rank
    alike. On failure the main process runs ``cleanup`` (remove the unfinished folder) and every
    rank raises the same message: the path, the error, ``needed()`` (bytes and what the estimate is
    of) against the free space, and ``next_step(path)``: what is still intact and how to go on.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    error: OSError | None = None
    try:
        yield
    except OSError as e:
        error = e
    except CheckpointException as e:  # a DCP write that failed, on any rank: every rank gets it
        failures = [exc for exc, _ in e.failures.values()]
        error = next((exc for exc in failures if isinstance(exc, OSError)), None)
        if error is None:
            # On a really full disk torch.save inside DCP sees a short write and fails its own
            # position check (a RuntimeError), not with ENOSPC: tell that case by the free space.
            if shutil.disk_usage(_existing_parent(path)).free >= needed()[0]:
                raise
            first = str(failures[0]).strip().splitlines()[-1] if failures else ""
            error = OSError(errno.ENOSPC, f"No space left on device ({type(failures[0]).__name__}: {first})")
    errors = [str(error) if error is not None else None]
    main = accelerator is None or accelerator.is_main_process
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = [f"rank {rank}: {e}" for rank, e in enumerate(gather_object(errors)) if e is not None]
    failed = [e for e in errors if e is not None]
    if not failed:
        return
    if main and cleanup is not None:
        cleanup()
    message = f"could not write {what} ({failed[0]})"
    if error is None or error.errno in (errno.ENOSPC, errno.EDQUOT):
        size, basis = needed()
        free = shutil.disk_usage(_existing_parent(path)).free
        message += (f": it needs about {_mib(size)} ({basis}) and {_mib(free)} are free on that disk" if size
                    else f": {_mib(free)} are free on that disk")
    elif error.errno == errno.EIO:
        message += ": an I/O error, the disk may be failing"
    raise SaveFailed(f"{message}; {next_step(path)}") from error


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
