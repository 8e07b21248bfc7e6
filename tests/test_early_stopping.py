"""train.early_stopping, and train.eval_every / save_every: epoch.

The runs: a fresh tiny Llama on 90 quickstart pairs at a constant lr of 0.05 (as tests/test_best.py).
Evaluated at every step, its eval loss is lowest at step 4 and worse after, so early stopping has
something to stop; evaluated once an epoch, it keeps falling, by less each time, so a threshold
stops it. Which step a run should stop at is worked out here from its own eval rows (``stop_step``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny import TINY as TINY_LLAMA

from orpo.cli import main
from orpo.config import ConfigError, load_config
from orpo.train import Trainer, Watcher, list_checkpoints, read_metrics
from orpo.train.checkpoint import read_weights
from orpo.train.health import BestCheckpoint

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"
TINY = {**TINY_LLAMA, "max_position_embeddings": 64}

pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(out, **train):
    return {
        "model": {"init": TINY, "tokenizer": str(QS / "tokenizer")},
        "data": {"train": str(QS / "train.jsonl"), "max_length": 64, "max_samples": 120, "eval_fraction": 0.25},
        "train": {"output_dir": str(out), "batch_size": 8, "learning_rate": 0.05, "lr_scheduler": "constant",
                  "max_steps": 12, "eval_every": 1, "save_total_limit": None, **train},
    }


def _train(raw, *watchers):
    trainer = Trainer(load_config(raw=raw), progress=False, watchers=list(watchers)).setup()
    return trainer, trainer.train()


def _evals(out, metric="eval_loss"):
    return [(r["step"], r[metric]) for r in read_metrics(out) if metric in r]


def stop_step(evals, goal, patience, threshold):
    """Where early stopping should end a run with these eval rows, and the best (value, step) then; None
    if it should not: the first eval that makes ``patience`` in a row not better than the best by more
    than ``threshold``."""
    best, best_step, bad = None, None, 0
    for step, value in evals:
        if best is None:
            best, best_step = value, step
            continue
        gain = best - value if goal == "min" else value - best
        bad = 0 if gain > threshold else bad + 1
        if gain > 0:
            best, best_step = value, step
        if bad >= patience:
            return step, best, best_step
    return None


def _tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---------------------------------------------------------------------------------------------
# eval_every / save_every: epoch


def _epoch_ends(rows, batch_size, grad_accum, epochs):
    """The optimizer steps that complete each whole epoch: the step holding its last micro-batch."""
    per_epoch = math.ceil(rows / batch_size)
    return [math.ceil(e * per_epoch / grad_accum) for e in range(1, int(epochs) + 1)]


@pytest.mark.parametrize("grad_accum", [1, 5])
def test_epoch_cadence_evaluates_and_saves_at_each_epochs_end(tmp_path, grad_accum):
    raw = _raw(tmp_path / "run", max_steps=None, epochs=2.5, grad_accum=grad_accum, eval_every="epoch",
               save_every="epoch")
    trainer, result = _train(raw)
    ends = _epoch_ends(len(trainer.train_data), 8, grad_accum, 2.5)
    total = math.ceil(2.5 * math.ceil(len(trainer.train_data) / 8) / grad_accum)
    assert result.steps == total and ends[-1] < total  # the last epoch is a half one: its end is the run's end
    if grad_accum > 1:
        assert any(e * math.ceil(len(trainer.train_data) / 8) % grad_accum for e in (1, 2))  # an epoch ends mid-step
    assert [s for s, _ in _evals(trainer.output_dir)] == [0, *ends, total]
    assert [p.name for p in list_checkpoints(trainer.output_dir)] == [f"step-{s}" for s in ends]


def test_a_cadence_is_steps_or_epoch(tmp_path):
    for bad in ("weekly", 0, True):
        with pytest.raises(ConfigError, match=r"train.eval_every: .* neither a number of optimizer steps > 0 nor 'epoch'"):
            load_config(raw=_raw(tmp_path, eval_every=bad))
    with pytest.raises(ConfigError, match=r"train.save_every: 'Epoch' is neither"):
        load_config(raw=_raw(tmp_path, save_every="Epoch"))
    assert load_config(raw=_raw(tmp_path, eval_every="epoch", save_every=3)).train.save_every == 3


# ---------------------------------------------------------------------------------------------
# Early stopping


class StopAfter(Watcher):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, row):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt  # as a kill would: no final/, the checkpoints stay


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """An early-stopped run through the CLI (patience 2, at every step, every step checkpointed)."""
    tmp = tmp_path_factory.mktemp("stop")
    raw = _raw(tmp / "run", save_every=1, early_stopping={"patience": 2})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return tmp, main(["train", str(tmp / "cfg.yaml")])


def test_early_stopping_ends_the_run_normally_at_patience(stopped):
    tmp, status = stopped
    out = tmp / "run"
    evals = _evals(out)
    expected = stop_step(evals, "min", 2, 0.0)
    assert expected is not None
    step, best, best_step = expected
    assert status == 0 and step == evals[-1][0] < 12  # stopped early, at the eval that made patience
    assert 0 < best_step < step  # the best is neither the start nor the end
    assert json.loads((out / ".orpo.json").read_text()).get("finished_step") == step
    assert (out / "final").is_dir() and list_checkpoints(out)[-1].name == f"step-{step}"
    # best/ is kept without train.save_best, with the weights of the best eval's checkpoint
    saved = read_weights(out / "checkpoints" / f"step-{best_step}")
    best_dir = _tensors(out / "best")
    assert saved and all(best_dir[k].equal(v) for k, v in saved.items())
    assert not all(_tensors(out / "final")[k].equal(v) for k, v in saved.items())
    assert f"at step {best_step}" in (out / "best" / "README.md").read_text()


def test_early_stopping_says_so_in_the_summary(tmp_path, capsys):
    trainer, result = _train(_raw(tmp_path / "run", early_stopping={"patience": 2}))
    step, best, best_step = stop_step(_evals(trainer.output_dir), "min", 2, 0.0)
    line = (f"early stopping: eval_loss did not improve by more than 0.0 for 2 evals; best {best:.4f} "
            f"at step {best_step}")
    assert result.steps == step and line in result.notes
    assert line in capsys.readouterr().err


def test_threshold_counts_small_gains_as_none(tmp_path, stopped):
    evals = _evals(stopped[0] / "run")
    assert stop_step(evals, "min", 1, 0.0)[0] != stop_step(evals, "min", 1, 0.05)[0]  # the threshold matters here
    trainer, result = _train(_raw(tmp_path / "run", early_stopping={"patience": 1, "threshold": 0.05}))
    own = _evals(trainer.output_dir)
    assert own == evals[: len(own)]  # the same run, up to where it stopped
    step, best, best_step = stop_step(own, "min", 1, 0.05)
    assert result.steps == step == own[-1][0]
    # a gain too small to reset the count still moves the best (and best/)
    assert trainer.state.watchers["best"] == {"metric": "eval_loss", "value": best, "step": best_step}


def test_accuracy_is_maximized(tmp_path):
    trainer, result = _train(_raw(tmp_path / "run", early_stopping={"metric": "eval_accuracy", "patience": 3}))
    evals = _evals(trainer.output_dir, "eval_accuracy")
    step, best, best_step = stop_step(evals, "max", 3, 0.0)
    assert result.steps == step == evals[-1][0]
    assert stop_step(evals, "min", 3, 0.0) is None or stop_step(evals, "min", 3, 0.0)[0] != step
    assert trainer.state.watchers["best"] == {"metric": "eval_accuracy", "value": best, "step": best_step}


def test_epoch_cadence_early_stopping_ends_at_an_epochs_end(tmp_path):
    raw = _raw(tmp_path / "run", max_steps=None, epochs=6, grad_accum=5, eval_every="epoch", save_every="epoch",
               early_stopping={"patience": 2, "threshold": 0.2})
    trainer, result = _train(raw)
    ends = _epoch_ends(len(trainer.train_data), 8, 5, 6)
    evals = _evals(trainer.output_dir)
    step, best, best_step = stop_step(evals, "min", 2, 0.2)
    assert result.steps == step == evals[-1][0] < trainer.total_steps
    assert [s for s, _ in evals] == [0, *[e for e in ends if e <= step]]
    assert list_checkpoints(trainer.output_dir)[-1].name == f"step-{step}"
    saved = read_weights(trainer.output_dir / "checkpoints" / f"step-{best_step}")
    assert all(_tensors(trainer.output_dir / "best")[k].equal(v) for k, v in saved.items())


def test_the_count_survives_a_resume(tmp_path, stopped):
    ref = stopped[0] / "run"
    step, _, _ = stop_step(_evals(ref), "min", 2, 0.0)
    out = tmp_path / "run"
    raw = _raw(out, save_every=1, early_stopping={"patience": 2})
    with pytest.raises(KeyboardInterrupt):
        _train(raw, StopAfter(step - 1))
    record = json.loads((out / "checkpoints" / f"step-{step - 1}" / "trainer_state.json").read_text())
    assert record["watchers"]["early_stopping"]["bad"] == 1  # one eval without improvement so far
    trainer, result = _train({**raw, "train": {**raw["train"], "resume": "auto"}})
    assert trainer.resume_from.name == f"step-{step - 1}"
    assert result.steps == step and _evals(out) == _evals(ref)
    assert any(n.startswith("early stopping: eval_loss did not improve") for n in result.notes)


def test_early_stopping_is_checked(tmp_path):
    def refused(match, **train):
        with pytest.raises(ConfigError, match=match):
            load_config(raw=_raw(tmp_path / "x", **train))

    refused(r"train.early_stopping judges the evals: set train.eval_every", eval_every=None, early_stopping={})
    refused(r"'loss' is not an eval metric", early_stopping={"metric": "loss"})
    refused(r"train.early_stopping.mode: whether 'eval_pairs' .* set mode to min or max",
            early_stopping={"metric": "eval_pairs"})
    refused(r"early_stopping.patience: Input should be greater than or equal to 1", early_stopping={"patience": 0})
    refused(r"train.early_stopping.metric 'eval_loss' \(min\) and train.save_best 'eval_accuracy' differ",
            early_stopping={}, save_best="eval_accuracy")
    refused(r"and train.save_best 'eval_loss' differ", early_stopping={"mode": "max"}, save_best="eval_loss")
    assert load_config(raw=_raw(tmp_path, early_stopping={"metric": "eval_pairs", "mode": "max"}))
    # one best/ writer when save_best names the same metric
    trainer = Trainer(load_config(raw=_raw(tmp_path / "y", early_stopping={}, save_best="eval_loss")), progress=False)
    assert sum(isinstance(w, BestCheckpoint) for w in trainer.watchers) == 1


def test_a_metric_the_eval_rows_lack_is_refused_at_setup(tmp_path):
    for metric, has in (("eval_general_ppl", "eval_loss, eval_nll_loss"), ("eval_reward_margin", "eval_or_loss")):
        out = tmp_path / metric
        cfg = load_config(raw=_raw(out, early_stopping={"metric": metric, "mode": "max"}))
        with pytest.raises(ConfigError, match=rf"train.early_stopping.metric: this run has no eval metric "
                                              rf"'{metric}' \(it has: .*{has}"):
            Trainer(cfg, progress=False).setup()
        assert not out.exists()  # refused before the run folder is touched


def test_an_early_stopped_run_is_finished_for_resume_auto(tmp_path, stopped, capsys):
    """Was: ``resume=auto`` trained on from the newest checkpoint and stopped again, rewriting final/."""
    tmp, _ = stopped
    out = tmp_path / "run"
    shutil.copytree(tmp / "run", out, symlinks=True)
    final = _tensors(out / "final")
    status = main(["train", str(tmp / "cfg.yaml"), f"train.output_dir={out}", "train.resume=auto"])
    assert status == 2
    assert "stopped early" in capsys.readouterr().err
    assert all(_tensors(out / "final")[k].equal(v) for k, v in final.items())
