"""The resume decision: which checkpoint a run goes on from (or none), whether the run folder is
orpo's to use, whether the run has changed since the checkpoint; and claiming the folder at the end
of set-up (``disk``'s rules: marker, lock, removing only what the previous run made)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orpo import disk
from orpo.config import Config, ConfigError
from orpo.train.checkpoint import (
    CHECKPOINTS,
    WHAT,
    CheckpointStatus,
    TrainState,
    checkpoint_root,
    inspect_checkpoint,
    list_checkpoints,
    read_state,
    step_folders,
)


class ResumeError(ConfigError):
    """Refusing to resume (or to start over) for a reason the user must decide on."""




# What a run folder holds (``train.output_dir``).
RUN_FILES = (CHECKPOINTS, "final", "best", "tensorboard", "wandb", "metrics.jsonl", "samples.jsonl", "config.yaml",
             "data_summary.json")


def _legacy_run(folder: Path, names: list[str]) -> bool:
    """A run written before run folders had a marker: only a run's names, and a run's own evidence
    (metrics or checkpoints), so a folder holding just the user's ``config.yaml`` is not one."""
    return set(names) <= set(RUN_FILES) and bool({"metrics.jsonl", CHECKPOINTS} & set(names))


def inspect_run_dir(output_dir: Path) -> dict[str, Any] | None:
    """``disk.inspect_folder`` for a run folder: its marker, None if new or empty; refuses a folder
    orpo did not make, a file, ``/`` and home. Reads only."""
    return disk.inspect_folder(Path(output_dir), "run", WHAT, legacy=_legacy_run)


def finished_step(output_dir: Path, marker: dict[str, Any] | None) -> int | None:
    """The step a run finished at (its ``final/`` written), None while unfinished; -1: finished,
    step unknown (a run from before the marker)."""
    if marker is None:
        return None
    if marker.get("adopted"):
        return -1 if (Path(output_dir) / "final").is_dir() else None
    return marker.get("finished_step")


def finished_run(output_dir: Path, step: int, early: str | None = None) -> ResumeError:
    """``resume: auto`` on a run that has nothing left to train (``final/`` written), or that
    stopped early (``early``: why)."""
    at = f" at step {step}" if step >= 0 else ""
    if early:
        return ResumeError(f"train.resume=auto: {output_dir} holds a run that stopped early (final/ written{at}; "
                           f"{early}): give a checkpoint as train.resume to train on from it, set "
                           "train.overwrite=true to train it again from step 0, or pick another train.output_dir")
    return ResumeError(f"train.resume=auto: {output_dir} holds a finished run (final/ written{at}) with nothing left "
                       "to train: raise train.max_steps (or train.epochs) to train on from its last checkpoint, set "
                       "train.overwrite=true to train it again from step 0, or pick another train.output_dir")


def resolve_resume(cfg: Config, verify: Callable[[Path], CheckpointStatus] = inspect_checkpoint,
                   report: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to clobber a previous run.

    Reads only (the previous run is removed later, after every input was checked). The folder must
    be orpo's (``inspect_run_dir``). ``auto`` takes the newest complete checkpoint (``verify``:
    manifest, sizes, checksums) and ``report``s each newer one it skips, by name and reason. An explicit path that is
    not complete is refused. ``never`` in a folder that already holds a run is refused unless
    ``train.overwrite`` is set.
    A finished run is continued only from a checkpoint (and only if steps are left, see the trainer's
    ``_setup_state``): it is never trained again from step 0 without ``train.overwrite``.
    """
    t = cfg.train
    out = Path(t.output_dir)
    marker = inspect_run_dir(out)
    if t.resume == "auto":
        finished = finished_step(out, marker)
        if finished is not None and t.overwrite:
            return None
        for folder in reversed(step_folders(out)):
            status = verify(folder)
            if status.complete:
                return folder
            report(f"checkpoint {folder} is {status.state}: {status.problem}; skipped")
        if finished is not None:
            raise finished_run(out, finished)
        return None
    if t.resume != "never":
        path = disk.expand(t.resume)
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


def claim_run_dir(output_dir: Path, start_over: bool) -> disk.FolderLock:
    """Make ``output_dir`` this run's (main process, after every input was checked): claim it, lock it
    for the run's lifetime, and when ``start_over`` remove what the previous run made there (only that)."""
    disk.claim(Path(output_dir), "run", WHAT, legacy=_legacy_run)
    lock = disk.FolderLock(Path(output_dir), WHAT)
    if start_over:
        disk.remove_made(Path(output_dir))
    return lock


# Settings that change what a step computes or which data it sees: resuming across a change
# would silently produce a run that matches neither configuration. The data itself (files,
# template, lengths) is covered by the fingerprint of the tokenized dataset. The batch is checked
# as a global micro-batch (batch_size x processes), see check_resume_compatible.
RESUME_KEYS = (
    "model.name_or_path", "model.init", "model.revision", "model.lora", "model.load_in_4bit",
    "model.quantization", "model.init_kwargs", "orpo.objective", "orpo.nll_on_prompt", "train.seed", "train.grad_accum", "train.max_tokens_per_batch",
    "train.optimizer",  # another optimizer's state has other names: nothing in the checkpoint would load
)
# what a checkpoint written before a key existed had: the key's default then
RESUME_DEFAULTS: dict[str, Any] = {"train.optimizer": "adamw", "model.init_kwargs": {}}


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
        a = RESUME_DEFAULTS.get(key) if a is None else a
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


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(k)
    return node
