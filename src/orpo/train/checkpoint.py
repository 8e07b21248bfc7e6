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
import hashlib
import io
import json
import pickle
import random
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from orpo import disk
from orpo.config import Config
from orpo.disk import SaveFailed, remove_tree, stop_on_write_error, write_atomic
from orpo.train.optim import optimizer_label, optimizer_state_bytes
from orpo.train.safe_dcp import read_dcp_metadata, safe_planner, safe_reader

__all__ = ["SaveFailed", "TrainState"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
STATE_DIR = "state"
DEEPSPEED_DIR = "deepspeed"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
WHAT = "train.output_dir"  # the key named when orpo refuses to write into the run folder


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
        """Parse a ``trainer_state.json``; ``ValueError`` naming the key that is unknown or of the wrong type."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name: f for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown key {key!r} (written by another version of orpo?)")
            want = _STATE_TYPES[key]
            if not isinstance(value, want) or (isinstance(value, bool) and bool not in _as_tuple(want)):
                raise ValueError(f"{key!r} is {type(value).__name__}, not {_type_names(want)}")
        return cls(**data)


_STATE_TYPES: dict[str, Any] = {
    "step": int, "epoch": int, "micro_batch": int, "skipped_steps": int, "bad_in_a_row": int, "tokens_seen": int,
    "best_eval": (dict, type(None)), "last_eval_step": (int, type(None)), "train_seconds": (int, float),
    "data_fingerprint": str, "num_processes": int, "warnings": dict, "engine": str, "watchers": dict,
}


def _as_tuple(t: Any) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _type_names(t: Any) -> str:
    return " or ".join("null" if x is type(None) else x.__name__ for x in _as_tuple(t))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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


def resume_hint(output_dir: Path) -> Callable[[Path], str]:
    """What a failed save's message says next (``disk.stop_on_write_error``): the checkpoint that is intact."""

    def hint(path: Path) -> str:
        newest = list_checkpoints(output_dir)
        if newest:
            return (f"nothing new was published at {path}, and the newest checkpoint, {newest[-1]}, is "
                    "intact: free some space, then resume with train.resume=auto")
        return (f"nothing new was published at {path}, and there is no checkpoint to resume from "
                "(train.save_every keeps some): free some space and start over")

    return hint


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
        manifest = read_manifest(folder)
    except (OSError, ValueError) as e:
        status.state, status.problem = "damaged", f"{MANIFEST}: {e}"
        return status
    files: dict[str, dict[str, Any]] = manifest["files"]
    status.files, status.bytes = len(files), sum(e["size"] for e in files.values())
    status.num_processes, status.engine = manifest["num_processes"], manifest["engine"]
    problems = _spread(sorted(files), lambda rel: _problem(folder, rel, files[rel], checksums), accelerator)
    found = [p for p in problems if p]
    if not found:
        found = [p for p in (_unreadable_state(folder),) if p]
    if found:
        status.state = "damaged"
        status.problem = found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
    else:
        status.state = "complete"
    return status


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(folder: Path) -> dict[str, Any]:
    """A checkpoint's manifest, checked against its schema; ``ValueError`` saying what is wrong.

    Every entry is a relative path inside the checkpoint (no ``..``, no absolute path, no link out)
    with an integer size and a sha256, and the files a checkpoint cannot do without are listed: an
    empty or malformed manifest is damage, not a complete checkpoint.
    """
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("not a manifest (no 'files' mapping)")
    for key, kind in (("step", int), ("num_processes", int), ("engine", str)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ValueError(f"'{key}' is missing or not a{'n' if kind is int else ''} {kind.__name__}")
    root = folder.resolve()
    for rel, entry in manifest["files"].items():
        path = Path(rel)
        if path.is_absolute() or ".." in path.parts or rel in ("", ".") or "\\" in rel:
            raise ValueError(f"entry {rel!r} is not a path inside the checkpoint")
        if (folder / path).is_symlink() or not (folder / path).resolve().is_relative_to(root):
            raise ValueError(f"entry {rel!r} leads out of the checkpoint (a symlink)")
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry["size"], bool)
                or entry["size"] < 0 or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"])):
            raise ValueError(f"entry {rel!r} is not {{size: bytes, sha256: hex digest}}")
    listed = set(manifest["files"])
    needed = [STATE_FILE, "config.yaml", "scheduler.pt"]
    if not any(r.startswith(f"{DEEPSPEED_DIR}/") for r in listed):
        needed.append(f"{STATE_DIR}/.metadata")
    missing = [n for n in needed if n not in listed]
    if missing:
        raise ValueError(f"lists no {', '.join(missing)}")
    return manifest


def _unreadable_state(folder: Path) -> str | None:
    """What would stop a resume from reading a checkpoint whose files match its manifest (None: nothing)."""
    try:
        read_state(folder)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE}: {e}"
    if (folder / STATE_DIR / ".metadata").is_file():
        try:
            read_dcp_metadata(folder / STATE_DIR)
        except (OSError, pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError) as e:
            return f"{STATE_DIR}/.metadata: {e}"
    return None


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
    # a symlink is not a checkpoint this run wrote: never listed, so never entered or rotated
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and not p.is_symlink() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (a manifest is in place), oldest first; not checksummed."""
    return [p for p in step_folders(output_dir) if (p / MANIFEST).is_file()]


def remove_checkpoint(folder: Path) -> None:
    """Manifest first: a kill while deleting leaves an incomplete folder, not a complete-looking one.
    A symlink in its place is unlinked; what it points to is never entered."""
    if not folder.is_symlink():
        (folder / MANIFEST).unlink(missing_ok=True)
    remove_tree(folder)


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` finished checkpoints, and every unfinished folder.

    Called by the main process right after a checkpoint was committed, when no other save is in
    flight, so an unfinished folder can only be the leftover of a killed save.
    """
    root = checkpoint_root(output_dir)
    for leftover in root.glob(".step-*.tmp"):  # the temporary folders of earlier versions
        remove_tree(leftover)
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
    failing = partial(stop_on_write_error, f"checkpoint {folder}", folder, acc,
                      partial(_checkpoint_bytes, output_dir, engine, model, cfg.train.optimizer),
                      partial(remove_checkpoint, folder),
                      resume_hint(output_dir))
    with failing():
        if acc.is_main_process:
            disk.child(output_dir, CHECKPOINTS, WHAT)
            if folder.exists() or folder.is_symlink():
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


def _checkpoint_bytes(output_dir: Path, engine, model, optimizer: str) -> tuple[int, str]:
    """The size of the newest finished checkpoint, else an estimate from the model and optimizer state."""
    newest = list_checkpoints(output_dir)
    if newest:
        with contextlib.suppress(OSError, ValueError, KeyError):
            files = json.loads((newest[-1] / MANIFEST).read_text())["files"]
            return sum(e["size"] for e in files.values()), f"the size of {newest[-1].name}"
    params = [p for p in engine.unwrap(model).parameters() if p.requires_grad]
    return (tensor_bytes(params) + optimizer_state_bytes(optimizer, params),
            f"trainable weights and {optimizer_label(optimizer)} state")


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


def read_state(ckpt: Path) -> TrainState:
    return TrainState.from_json((ckpt / STATE_FILE).read_text(encoding="utf-8"))


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, whatever number of processes wrote them, as one plain state dict
    keyed by parameter name; trainable parameters only (a LoRA checkpoint holds the adapter). For
    looking inside a checkpoint; training resumes through ``load_checkpoint``."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # a crafted index fails here, by name, before DCP retries it as per-rank metadata
    read_dcp_metadata(Path(ckpt) / STATE_DIR)
    state: dict[str, Any] = {}
    # what torch's dcp_to_torch_save does, with a reader and planner that unpickle no code
    with _single_process_ok():
        _load_state_dict(state, storage_reader=safe_reader(Path(ckpt) / STATE_DIR), planner=safe_planner(rebuild=True),
                         no_dist=True)
    return state["model"]


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
            dcp.load(state, storage_reader=safe_reader(ckpt / STATE_DIR), planner=safe_planner())
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
