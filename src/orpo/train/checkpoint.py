"""Checkpoints that survive a kill at any instant, their integrity, rotation and the resume decision.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-N/``, written by every process of the run:

    state/               model and AdamW state through torch.distributed.checkpoint: one
                         ``__R_0.distcp`` file per rank R and a ``.metadata`` index (trainable
                         parameters only: a LoRA checkpoint holds the adapter, not the base)
    deepspeed/           instead of state/ under ZeRO: DeepSpeed's own per-rank files
    rng_state_R.pt       python, numpy, torch CPU and CUDA generators of rank R
    scheduler.pt         the LR scheduler position
    trainer_state.json   step, data position (epoch, global micro-batch), skipped/bad step counters,
                         tokens seen, best eval, data fingerprint, number of processes, engine
    config.yaml          the resolved configuration of the run that wrote it
    manifest.json        written last: size and sha256 of every file above

The manifest is the commit point. It is written (to a temporary name, fsynced, renamed) only after
every rank has written and fsynced its files and the files' checksums are known, so a folder without
one is **incomplete** (the save was killed), and a folder whose files no longer match it is
**damaged**; resume takes the newest **complete** one and names each one it skips. Deleting a
checkpoint removes its manifest first, so a kill while deleting leaves an incomplete folder, never a
complete-looking partial one.

The model and optimizer state are keyed by parameter name, not by process: a checkpoint written by N
processes (any engine but ZeRO) loads on M processes, sharded or not (``load_checkpoint``).

A save that fails with an ``OSError`` (a full disk, an I/O error) on any rank stops every rank with
one ``SaveFailed`` (``stop_on_write_error``): the unfinished folder is removed, the previous
checkpoint is untouched, and the message names the path, the space needed and the space free.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from orpo.config import Config, ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
STATE_DIR = "state"
DEEPSPEED_DIR = "deepspeed"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ConfigError):
    """Refusing to resume (or to start over) for a reason the user must decide on."""


class SaveFailed(RuntimeError):
    """A checkpoint or model folder could not be written (disk full, I/O error); what was there is intact."""


@dataclass
class TrainState:
    """The loop's own state: everything but the model, optimizer, scheduler and RNGs."""

    step: int = 0
    epoch: int = 0  # data position: the next micro-batch is number `micro_batch` of epoch `epoch`
    micro_batch: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm, in total
    bad_in_a_row: int = 0  # consecutive skipped steps (the run stops at train.max_bad_steps)
    tokens_seen: int = 0
    best_eval: dict[str, float] | None = None
    last_eval_step: int | None = None
    train_seconds: float = 0.0  # time inside optimizer steps, for tokens/s
    data_fingerprint: str = ""
    num_processes: int = 1
    warnings: dict[str, str] = field(default_factory=dict)  # run-health code -> message, each said once
    engine: str = "single"  # train.distributed as resolved for the run that wrote it
    watchers: dict[str, Any] = field(default_factory=dict)  # watchers' own state (best eval, windows), JSON

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------
# Durable writes


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent/old or complete, and on disk (fsynced) when this returns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it to ``final`` (replacing it).

    ``os.rename`` within one directory is atomic, so readers see either the old folder or the new
    complete one. A failure removes the temporary folder and leaves ``final`` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
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
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp)  # the old folder, now under the temporary name
        return
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old)


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


@contextmanager
def quiet_saving() -> Iterator[None]:
    """No transformers "Writing model shards" bar over our own progress bar while saving."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# A save that fails


@contextmanager
def stop_on_write_error(what: str, path: Path, output_dir: Path, accelerator=None,
                        needed: Callable[[], tuple[int, str]] = lambda: (0, ""),
                        cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run one phase of a save's writes; an ``OSError`` on any rank raises ``SaveFailed`` on every rank.

    Every rank leaves the block and then takes part in one collective (which is also the phase's
    barrier), so no rank waits forever in a later collective for one that failed. The block itself
    may hold no collective but ``torch.distributed.checkpoint``'s own, which fails on every rank
    alike. On failure the main process runs ``cleanup`` (remove the unfinished folder) and every
    rank raises the same message: the path, the error, ``needed()`` (bytes and what the estimate is
    of) against the free space, what is still intact and how to go on.
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
    newest = list_checkpoints(output_dir)
    if newest:
        message += (f"; nothing new was published at {path}, and the newest checkpoint, {newest[-1]}, is "
                    "intact: free some space, then resume with train.resume=auto")
    else:
        message += (f"; nothing new was published at {path}, and there is no checkpoint to resume from "
                    "(train.save_every keeps some): free some space and start over")
    raise SaveFailed(message) from error


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def tensor_bytes(tensors: Any) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it writes, about."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


# ---------------------------------------------------------------------------------------------
# Integrity: the manifest


@dataclass
class CheckpointStatus:
    """What a look at one checkpoint folder found."""

    path: Path
    step: int
    state: str  # "complete" | "incomplete" | "damaged"
    problem: str | None = None  # why it is not complete, naming the file
    files: int = 0
    bytes: int = 0
    num_processes: int | None = None
    engine: str | None = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def describe(self) -> str:
        what = f"{self.path.name:<12} {self.state:<10}"
        if self.complete:
            return (f"{what} {self.files} files, {self.bytes / 2**20:,.1f} MiB, written by {self.num_processes} "
                    f"process{'es' if self.num_processes != 1 else ''} ({self.engine})")
        return f"{what} {self.problem}"


def _relative_files(folder: Path) -> list[str]:
    """Every file of a checkpoint but the manifest (and temporary files), as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def _file_record(folder: Path, rel: str) -> tuple[str, dict[str, Any]]:
    path = folder / rel
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return rel, {"size": path.stat().st_size, "sha256": digest}


def _spread(items: list, fn: Callable, accelerator=None) -> list:
    """``[fn(x) for x in items]``, each process computing a share (the results gathered on all)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [fn(x) for x in items]
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [(i, fn(x)) for i, x in enumerate(items) if i % world == rank]
    return [r for _, r in sorted(gather_object(mine), key=lambda pair: pair[0])]


def _problem(folder: Path, rel: str, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """What is wrong with one file against its manifest entry (None: nothing)."""
    path = folder / rel
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{rel} has {size:,} bytes, the manifest says {entry['size']:,}"
    if checksum and _file_record(folder, rel)[1]["sha256"] != entry["sha256"]:
        return f"{rel}: sha256 differs from the manifest (the file changed after it was written)"
    return None


def inspect_checkpoint(folder: Path, accelerator=None, checksums: bool = True) -> CheckpointStatus:
    """Complete, incomplete or damaged: sizes always, sha256 of every file when ``checksums``.

    With an ``accelerator`` of several processes the files are hashed in parallel, a share each,
    and every process returns the same answer.
    """
    folder = Path(folder)
    m = _STEP_DIR.match(folder.name)
    status = CheckpointStatus(path=folder, step=int(m.group(1)) if m else -1, state="incomplete")
    if not folder.is_dir():
        status.problem = "no such folder"
        return status
    if not (folder / MANIFEST).is_file():
        status.problem = f"no {MANIFEST}: the save did not finish"
        return status
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        status.state, status.problem = "damaged", f"{MANIFEST} is unreadable ({e})"
        return status
    status.files, status.bytes = len(files), sum(e["size"] for e in files.values())
    status.num_processes, status.engine = manifest.get("num_processes"), manifest.get("engine")
    problems = _spread(sorted(files), lambda rel: _problem(folder, rel, files[rel], checksums), accelerator)
    found = [p for p in problems if p]
    if found:
        status.state = "damaged"
        status.problem = found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
    else:
        status.state = "complete"
    return status


def checksum_files(folder: Path, accelerator=None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a checkpoint (each process a share; every process calls it)."""
    return dict(_spread(_relative_files(folder), lambda rel: _file_record(folder, rel), accelerator))


def write_manifest(folder: Path, state: TrainState, records: dict[str, dict[str, Any]]) -> None:
    """The checkpoint's commit point, written by the main process after every file was checksummed."""
    manifest = {"format": MANIFEST_FORMAT, "step": state.step, "num_processes": state.num_processes,
                "engine": state.engine, "files": records}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


# ---------------------------------------------------------------------------------------------
# Listing and rotation


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every ``step-N`` folder, whatever its state, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (a manifest is in place), oldest first; not checksummed."""
    return [p for p in step_folders(output_dir) if (p / MANIFEST).is_file()]


def remove_checkpoint(folder: Path) -> None:
    """Manifest first: a kill while deleting leaves an incomplete folder, not a complete-looking one."""
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` finished checkpoints, and every unfinished folder.

    Called by the main process right after a checkpoint was committed, when no other save is in
    flight, so an unfinished folder can only be the leftover of a killed save.
    """
    root = checkpoint_root(output_dir)
    for leftover in root.glob(".step-*.tmp"):  # the temporary folders of earlier versions
        shutil.rmtree(leftover, ignore_errors=True)
    removed = [p for p in step_folders(output_dir) if not (p / MANIFEST).is_file()]
    finished = list_checkpoints(output_dir)
    removed += finished[:-keep] if keep else []
    for p in removed:
        remove_checkpoint(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(engine, output_dir: str | Path, model, optimizer, scheduler, state: TrainState,
                    cfg: Config, keep: int | None) -> Path:
    """Write ``checkpoints/step-{state.step}`` from every rank, commit it with its manifest, rotate.

    1. the main process removes a leftover folder of the same name (a killed or damaged save);
    2. every rank writes its part of the model and optimizer state and its RNG state, the main
       process the scheduler, trainer state and config (all fsynced);
    3. the files are checksummed (each rank a share) and the main process writes the manifest;
    4. the main process deletes the checkpoints beyond ``keep`` and any unfinished folder.
    A kill before the manifest's rename leaves an incomplete folder that resume skips. A write
    that fails (a full disk) removes the folder and raises ``SaveFailed`` on every rank.
    """
    acc = engine.accelerator
    output_dir = Path(output_dir)
    folder = checkpoint_root(output_dir) / f"step-{state.step}"
    failing = partial(stop_on_write_error, f"checkpoint {folder}", folder, output_dir, acc,
                      partial(_checkpoint_bytes, output_dir, engine, model), partial(remove_checkpoint, folder))
    with failing():
        if acc.is_main_process:
            if folder.exists():
                remove_checkpoint(folder)
            folder.mkdir(parents=True)
    with failing():
        if engine.deepspeed:
            model.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=STATE_DIR)
        else:
            import torch.distributed.checkpoint as dcp

            with _single_process_ok():
                dcp.save(_dcp_state(engine, model), checkpoint_id=folder / STATE_DIR)
        write_atomic(folder / f"rng_state_{acc.process_index}.pt", _torch_bytes(rng_state()))
        if acc.is_main_process:
            write_atomic(folder / "scheduler.pt", _torch_bytes(scheduler.state_dict()))
            write_atomic(folder / "config.yaml", dump_config(cfg).encode())
            write_atomic(folder / STATE_FILE, state.to_json().encode())
    records = checksum_files(folder, acc)
    with failing():
        if acc.is_main_process:
            write_manifest(folder, state, records)
    if acc.is_main_process:
        rotate_checkpoints(output_dir, keep)
    acc.wait_for_everyone()
    return folder


def _checkpoint_bytes(output_dir: Path, engine, model) -> tuple[int, str]:
    """The size of the newest finished checkpoint, else an estimate from the model and AdamW state."""
    newest = list_checkpoints(output_dir)
    if newest:
        with contextlib.suppress(OSError, ValueError, KeyError):
            files = json.loads((newest[-1] / MANIFEST).read_text())["files"]
            return sum(e["size"] for e in files.values()), f"the size of {newest[-1].name}"
    params = [p for p in engine.unwrap(model).parameters() if p.requires_grad]
    return 3 * tensor_bytes(params), "trainable weights and two AdamW moments"


def _dcp_state(engine, model) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name (sharded tensors stay sharded): what
    ``torch.distributed.checkpoint`` saves and reshards on load. Frozen parameters (a LoRA base)
    are not part of a checkpoint: they come from the model's own source."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(engine.unwrap(model), engine.torch_optimizer,
                              options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optimizer": osd}


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """torch.distributed.checkpoint warns at every save of a single process (no process group):
    that is our normal one-process case, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def rng_state() -> dict[str, Any]:
    np_state: tuple = np.random.get_state(legacy=True)  # type: ignore[assignment]
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------
# Resume


def resolve_resume(cfg: Config, verify: Callable[[Path], CheckpointStatus] = inspect_checkpoint,
                   report: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to clobber a previous run.

    ``auto`` takes the newest complete checkpoint (``verify``: manifest, sizes, checksums) and
    ``report``s each newer one it skips, by name and reason. An explicit path that is not complete
    is refused. ``never`` in an output_dir that already has checkpoints (or a final model) is
    refused unless ``train.overwrite`` is set, in which case the old checkpoints, metrics and final
    model go.
    """
    t = cfg.train
    out = Path(t.output_dir)
    if t.resume == "auto":
        for folder in reversed(step_folders(out)):
            status = verify(folder)
            if status.complete:
                return folder
            report(f"checkpoint {folder} is {status.state}: {status.problem}; skipped")
        return None
    if t.resume != "never":
        path = Path(t.resume)
        status = verify(path)
        if not status.complete:
            raise ResumeError(f"train.resume: {path} is not a complete checkpoint ({status.state}: {status.problem}). "
                              f"Finished checkpoints "
                              f"in {checkpoint_root(out)}: {[p.name for p in list_checkpoints(out)] or 'none'}")
        return path
    previous = [p for p in (checkpoint_root(out), out / "final", out / "metrics.jsonl") if p.exists()]
    has_run = bool(step_folders(out)) or (out / "final").exists()
    if has_run and not t.overwrite:
        raise ResumeError(
            f"{out} already holds a run ({', '.join(p.name for p in previous)}). "
            "Continue it with train.resume=auto, pick another train.output_dir, "
            "or set train.overwrite=true to delete it and start over."
        )
    return None


def clear_previous_run(output_dir: str | Path) -> None:
    """Remove checkpoints, final and best models, metrics and TensorBoard logs of a run being overwritten."""
    out = Path(output_dir)
    for name in (CHECKPOINTS, "final", "best", "tensorboard"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("metrics.jsonl", "samples.jsonl"):
        if (out / name).exists():
            (out / name).unlink()


# Settings that change what a step computes or which data it sees: resuming across a change
# would silently produce a run that matches neither configuration. The data itself (files,
# template, lengths) is covered by the fingerprint of the tokenized dataset. The batch is checked
# as a global micro-batch (batch_size x processes), see check_resume_compatible.
RESUME_KEYS = (
    "model.name_or_path", "model.init", "model.revision", "model.lora", "model.load_in_4bit",
    "orpo.objective", "orpo.nll_on_prompt", "train.seed", "train.grad_accum", "train.max_tokens_per_batch",
)


def read_state(ckpt: Path) -> TrainState:
    return TrainState.from_json((ckpt / STATE_FILE).read_text())


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, whatever number of processes wrote them, as one plain state dict
    keyed by parameter name; trainable parameters only (a LoRA checkpoint holds the adapter). For
    looking inside a checkpoint; training resumes through ``load_checkpoint``."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp, _single_process_ok():
        dcp_to_torch_save(Path(ckpt) / STATE_DIR, Path(tmp) / "state.pt")
        return torch.load(Path(tmp) / "state.pt", weights_only=False)["model"]


def check_resume_compatible(ckpt: Path, cfg: Config, fingerprint: str, num_processes: int, engine: str,
                            micro_batches_per_epoch: Callable[[int, int], int]) -> TrainState:
    """Load the checkpoint's state; refuse, listing every difference, if the run has changed.

    Another process count is the same run when the global micro-batch (``batch_size`` x
    processes) and so the data order over it are unchanged: ``micro_batches_per_epoch(batch_size,
    processes)`` must agree too (the last, short micro-batch of an epoch is dropped when it has
    fewer rows than processes). ZeRO checkpoints are DeepSpeed's own files: same engine and
    process count only.
    """
    state = read_state(ckpt)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    now = cfg.model_dump(mode="json")
    diffs = []
    if state.data_fingerprint != fingerprint:
        diffs.append(f"data fingerprint: checkpoint {state.data_fingerprint}, now {fingerprint} "
                     "(the tokenized training data differs)")
    for key in RESUME_KEYS:
        a, b = _get(saved, key), _get(now, key)
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    old_bs, old_n, bs = saved["train"]["batch_size"], state.num_processes, cfg.train.batch_size
    if cfg.train.max_tokens_per_batch is not None:
        if old_n != num_processes:  # a step is grad_accum token-budget micro-batches per process
            diffs.append(f"processes: checkpoint {old_n}, now {num_processes} (with train.max_tokens_per_batch "
                         "the global batch is a number of micro-batches per process)")
    elif old_bs * old_n != bs * num_processes:
        hint = ""
        if (old_bs * old_n) % num_processes == 0:
            hint = f"; set train.batch_size={old_bs * old_n // num_processes} to keep it"
        diffs.append(f"train.batch_size: checkpoint {old_bs}, now {bs} (global micro-batch: checkpoint {old_bs} x "
                     f"{old_n} processes = {old_bs * old_n} pairs, now {bs} x {num_processes} = "
                     f"{bs * num_processes}{hint})")
    elif micro_batches_per_epoch(old_bs, old_n) != micro_batches_per_epoch(bs, num_processes):
        diffs.append(f"processes: checkpoint {old_n}, now {num_processes}: the epoch's last, short micro-batch is "
                     "kept by one and dropped by the other (it has fewer rows than processes)")
    zero = {state.engine, engine} & {"zero2", "zero3"}
    if zero and (state.engine != engine or old_n != num_processes):
        diffs.append(f"engine: checkpoint {state.engine} on {old_n} processes, now {engine} on {num_processes} "
                     "(ZeRO checkpoints resume with the same engine and process count)")
    if diffs:
        raise ResumeError(
            f"cannot resume from {ckpt}: the run has changed\n  " + "\n  ".join(diffs)
            + "\nUse another train.output_dir for a new run, or train.resume=never with "
            "train.overwrite=true to start this one over."
        )
    return state


def load_checkpoint(engine, ckpt: Path, model, optimizer, scheduler, num_processes_saved: int) -> str | None:
    """Restore model, optimizer, scheduler and this rank's RNG state from ``ckpt``.

    Returns a note for the user when the RNG state could not be restored exactly (a process that
    did not exist in the run that saved: dropout masks then differ from that run's).
    """
    acc = engine.accelerator
    if engine.deepspeed:
        model.load_checkpoint(str(ckpt / DEEPSPEED_DIR), tag=STATE_DIR)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = _dcp_state(engine, model)
        # Every trainable tensor must be in the checkpoint (dcp.load raises otherwise); frozen ones
        # are absent on purpose, hence strict=False when handing the state to the model.
        with _single_process_ok():
            dcp.load(state, checkpoint_id=ckpt / STATE_DIR)
        set_state_dict(engine.unwrap(model), engine.torch_optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng_state_{acc.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    if acc.num_processes != num_processes_saved:
        return (f"resumed on {acc.num_processes} processes from a checkpoint of {num_processes_saved}: the data "
                "order over the global batch and the losses continue; dropout masks (if any) differ")
    return None


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(k)
    return node
