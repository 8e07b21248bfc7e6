"""Checkpoints that survive a kill at any moment, their rotation, and the resume decision.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-N/``; it is written under a hidden temporary name in
the same folder and renamed at the end, so a folder named ``step-N`` is always complete (a kill
leaves only a ``.step-N.tmp`` that the next run removes). It holds everything a resumed run needs to
continue exactly as the uninterrupted one would have:

    model/               save_pretrained: safetensors weights, or the LoRA adapter
    optimizer.pt         AdamW moments and step counts
    scheduler.pt         the LR scheduler position
    rng_state_{rank}.pt  python, numpy, torch CPU and CUDA generators of every process
    trainer_state.json   step, data position (epoch, micro-batch), skipped/bad step counters,
                         tokens seen, best eval, data fingerprint, number of processes
    config.yaml          the resolved configuration of the run that wrote it
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from orpo.config import Config, ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ConfigError):
    """Refusing to resume (or to start over) for a reason the user must decide on."""


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
    watchers: dict[str, Any] = field(default_factory=dict)  # watchers' own state (best eval, windows), JSON

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------
# Atomic folders and rotation


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


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``step-N`` with a state file), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and any leftover temp folders."""
    root = checkpoint_root(output_dir)
    for leftover in root.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    ckpts = list_checkpoints(output_dir)
    removed = ckpts[:-keep] if keep else []
    for p in removed:
        shutil.rmtree(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(accelerator, output_dir: str | Path, model, optimizer, scheduler, state: TrainState,
                    cfg: Config, keep: int | None) -> Path:
    """Write ``checkpoints/step-{state.step}`` atomically (every rank calls this), then rotate.

    Every rank writes its own RNG state into the shared temporary folder; the main process writes
    the rest and publishes the folder once all ranks are done.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        with quiet_saving():
            accelerator.unwrap_model(model).save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / STATE_FILE).write_text(state.to_json())  # last: its presence marks a complete folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_dir(tmp, final)
        rotate_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


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


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to clobber a previous run.

    ``never`` in an output_dir that already has checkpoints (or a final model) is refused unless
    ``train.overwrite`` is set, in which case the old checkpoints, metrics and final model go.
    """
    t = cfg.train
    out = Path(t.output_dir)
    if t.resume == "auto":
        ckpts = list_checkpoints(out)
        return ckpts[-1] if ckpts else None
    if t.resume != "never":
        path = Path(t.resume)
        if not (path / STATE_FILE).is_file():
            raise ResumeError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                              f"complete ones in {checkpoint_root(out)}: "
                              f"{[p.name for p in list_checkpoints(out)] or 'none'}")
        return path
    previous = [p for p in (checkpoint_root(out), out / "final", out / "metrics.jsonl") if p.exists()]
    has_run = bool(list_checkpoints(out)) or (out / "final").exists()
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
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()


# Settings that change what a step computes or which data it sees: resuming across a change
# would silently produce a run that matches neither configuration. The data itself (files,
# template, lengths) is covered by the fingerprint of the tokenized dataset.
RESUME_KEYS = (
    "model.name_or_path", "model.init", "model.revision", "model.lora", "model.load_in_4bit",
    "orpo.nll_on_prompt", "train.seed", "train.batch_size", "train.grad_accum",
    "train.max_tokens_per_batch",
)


def read_state(ckpt: Path) -> TrainState:
    return TrainState.from_json((ckpt / STATE_FILE).read_text())


def check_resume_compatible(ckpt: Path, cfg: Config, fingerprint: str, num_processes: int) -> TrainState:
    """Load the checkpoint's state; refuse, listing every difference, if the run has changed."""
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
    if state.num_processes != num_processes:
        diffs.append(f"processes: checkpoint {state.num_processes}, now {num_processes} (changes the data order)")
    if diffs:
        raise ResumeError(
            f"cannot resume from {ckpt}: the run has changed\n  " + "\n  ".join(diffs)
            + "\nUse another train.output_dir for a new run, or train.resume=never with "
            "train.overwrite=true to start this one over."
        )
    return state


def load_model_weights(model, folder: Path) -> None:
    """Load weights written by ``save_pretrained`` into an already built model (full or PEFT)."""
    from safetensors.torch import load_file

    from orpo.train.model import is_peft_model

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ResumeError(f"{folder}: adapter weights do not fit the model: {unexpected[:5]}")
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ResumeError(f"{folder}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied copies (e.g. lm_head.weight tied to the embedding): loading the
    # source fills both, so only a missing key that is not tied is an error.
    tied = {id(p) for n, p in model.named_parameters() if n not in missing}
    params = dict(model.named_parameters(remove_duplicate=False))
    truly_missing = [k for k in missing if k in params and id(params[k]) not in tied]
    if unexpected or truly_missing:
        raise ResumeError(f"{folder}: weights do not fit the model (missing {truly_missing[:5]}, "
                          f"unexpected {unexpected[:5]})")


def load_checkpoint(accelerator, ckpt: Path, model, optimizer, scheduler) -> None:
    """Restore model, optimizer, scheduler and this rank's RNG state from ``ckpt``."""
    load_model_weights(accelerator.unwrap_model(model), ckpt / "model")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng_state_{accelerator.process_index}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(k)
    return node
