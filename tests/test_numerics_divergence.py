"""Divergence: no checkpoint is written during a streak of skipped (non-finite) steps (a due save
waits for the first finite step), `TrainingDiverged` names a checkpoint from before the streak
(never the damaged one a run resumed from), and `orpo train` reports it in one line, exit status 3."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr

import pytest
import torch
import yaml
from tiny import TINY

from orpo.cli import EXIT_DIVERGED, main
from orpo.config import load_config
from orpo.train import Trainer, TrainingDiverged, list_checkpoints, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(out, stories_dir, hh_path, **train) -> dict:
    return {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "save_every": 2,
                  "save_total_limit": None, "save_final": False, **train},
    }


def _trainer(out, stories_dir, hh_path, poisoned: set[int] = frozenset(), **train) -> Trainer:
    trainer = Trainer(load_config(raw=_raw(out, stories_dir, hh_path, **train)), progress=False).setup()

    def hook(module, args, output):  # NaN final hidden states on the poisoned steps: a non-finite loss
        return output * float("nan") if trainer.state.step + 1 in poisoned else output

    # the final norm, not the LM head: chunked log-probs read the head's weights, never call it
    trainer.accelerator.unwrap_model(trainer.model).model.norm.register_forward_hook(hook)
    return trainer


def _state(ckpt) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def test_a_save_due_during_a_streak_waits_for_the_first_finite_step(tmp_path, stories_dir, hh_path):
    trainer = _trainer(tmp_path, stories_dir, hh_path, poisoned={3, 4}, max_bad_steps=5)
    trainer.train()
    # step-4 was due inside the streak (steps 3, 4): written at step 5, the first finite step after it
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-2", "step-5", "step-6"]
    assert all(_state(c)["bad_in_a_row"] == 0 for c in list_checkpoints(tmp_path))
    assert [r["skipped_steps"] for r in read_metrics(tmp_path)] == [0, 0, 1, 2, 2, 2]


def test_the_named_checkpoint_is_from_before_the_streak_and_survives_rotation(tmp_path, stories_dir, hh_path):
    """With save_total_limit 1, a save during the streak would have rotated step-2 away and the
    message would have named a checkpoint written during the non-finite steps."""
    trainer = _trainer(tmp_path, stories_dir, hh_path, poisoned={3, 4, 5, 6}, max_bad_steps=3, save_total_limit=1)
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    step2 = tmp_path / "checkpoints" / "step-2"
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-2"]
    assert info.value.checkpoint == step2
    assert str(info.value).startswith("training diverged: steps 3 to 5 (3 in a row, train.max_bad_steps = 3) "
                                      f"had a non-finite loss or gradient norm and were skipped; the last checkpoint "
                                      f"written before them is {step2}. To go on, lower train.learning_rate")


def test_resuming_from_a_damaged_checkpoint_names_the_one_before_it(tmp_path, stories_dir, hh_path):
    """The issue's run: the newest checkpoint holds non-finite weights that its manifest vouches for
    (damage on disk is caught by the checksums, tests/test_checkpoint.py; this is state that was
    already bad when it was saved), `resume: auto` loads it, every step is non-finite. The message
    names the checkpoint before it, and says why."""
    _trainer(tmp_path, stories_dir, hh_path, max_steps=4).train()
    resumed = _trainer(tmp_path, stories_dir, hh_path, max_steps=10, resume="auto", max_bad_steps=3)
    assert resumed.state.step == 4
    with torch.no_grad():
        next(resumed.accelerator.unwrap_model(resumed.model).parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        resumed.train()
    step2, step4 = (tmp_path / "checkpoints" / f"step-{n}" for n in (2, 4))
    assert info.value.checkpoint == step2
    assert f"the last checkpoint written before them is {step2} (not {step4}: no step after resuming from it " \
           "was finite, so it may be damaged)" in str(info.value)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-2", "step-4"]  # step-6 was never written


def test_orpo_train_reports_divergence_in_one_line_with_exit_status_3(tmp_path, stories_dir, hh_path):
    """No hook: a learning rate of 1000 without clipping diverges by itself."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path / "run", stories_dir, hh_path, learning_rate=1000.0,
                                       max_grad_norm=None, save_every=1, max_bad_steps=2)))
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["train", str(cfg)])
    assert code == EXIT_DIVERGED == 3
    assert "Traceback" not in err.getvalue()
    lines = [line for line in err.getvalue().splitlines() if "error" in line]
    step1 = tmp_path / "run" / "checkpoints" / "step-1"
    assert len(lines) == 1 and lines[0].startswith("orpo train: error: training diverged: steps 2 to 3")
    assert lines[0].endswith(f"then resume with train.resume={step1}.")
    assert err.getvalue().rstrip().endswith(lines[0])
