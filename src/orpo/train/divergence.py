"""When a run has diverged: ``train.max_bad_steps`` optimizer steps in a row with a non-finite loss
or gradient norm (each one skipped, weights untouched). The error names the checkpoint to go back
to and what to change, so the user's next command is in the message.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from orpo.config import Config
from orpo.train import checkpoint as ckpt


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm.

    ``checkpoint`` is the newest checkpoint written before the streak began (None if there is none).
    """

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def diverged(state: ckpt.TrainState, cfg: Config, resume_from: Path | None, output_dir: Path) -> TrainingDiverged:
    """The error for a run whose last ``state.bad_in_a_row`` steps were all skipped."""
    n, t = state.bad_in_a_row, cfg.train
    first = state.step - n + 1
    good, suspect = _checkpoint_before(first, resume_from, output_dir)
    where = (f"the last checkpoint written before them is {good}" if good is not None
             else f"no checkpoint was written before step {first}")
    if suspect is not None:
        where += f" (not {suspect}: no step after resuming from it was finite, so it may be damaged)"
    fixes = [f"lower train.learning_rate (now {t.learning_rate:g}; try {t.learning_rate / 10:g})"]
    if t.max_grad_norm is None:
        fixes.append("set train.max_grad_norm (now off; 1.0 is usual)")
    if t.mixed_precision == "fp16" or cfg.model.dtype == "float16":
        fixes.append("train in bf16 or float32 instead of float16 (train.mixed_precision, model.dtype)")
    resume = f", then resume with train.resume={good}" if good is not None else (
        "" if t.save_every else "; set train.save_every to keep checkpoints to resume from")
    return TrainingDiverged(
        f"training diverged: steps {first} to {state.step} ({n} in a row, train.max_bad_steps = "
        f"{t.max_bad_steps}) had a non-finite loss or gradient norm and were skipped; {where}. "
        f"To go on, {', '.join(fixes)}{resume}.",
        checkpoint=good,
    )


def _checkpoint_before(first_bad: int, resume_from: Path | None, output_dir: Path) -> tuple[Path | None, Path | None]:
    """(the newest checkpoint from before step ``first_bad``, a suspect one). The checkpoint this
    run resumed from is suspect, and passed over, when no step after loading it was finite."""
    suspect = None
    if resume_from is not None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            if ckpt.read_state(resume_from).step == first_bad - 1:
                suspect = resume_from
    for path in reversed(ckpt.list_checkpoints(output_dir)):
        if int(path.name.removeprefix("step-")) < first_bad and not (suspect and path.resolve() == suspect.resolve()):
            return path, suspect
    return None, suspect
