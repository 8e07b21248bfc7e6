"""The watcher seam: the moments a watcher sees, warnings said once, a stop request that checkpoints."""

from __future__ import annotations

import pytest
from tiny import TINY

from orpo.cli import main
from orpo.config import load_config
from orpo.train import Trainer, TrainingStopped, Watcher, list_checkpoints, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(out, stories_dir, hh_path, **train):
    return {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12, "eval_fraction": 0.25},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "eval_every": 2, **train},
    }


class Recorder(Watcher):
    def __init__(self):
        self.seen: list[tuple] = []

    def on_start(self, trainer):
        self.seen.append(("start", trainer.state.step))

    def on_step(self, trainer, row):
        self.seen.append(("step", trainer.state.step, row is not None))
        if trainer.state.step == 1:
            assert trainer.warn("too_loud", "first") and not trainer.warn("too_loud", "again")

    def on_eval(self, trainer, row):
        self.seen.append(("eval", row["step"], "eval_loss" in row))

    def on_save(self, trainer, path):
        self.seen.append(("save", path.name))

    def on_end(self, trainer, result):
        self.seen.append(("end", result.steps))
        result.notes.append("recorder: done")


def test_a_watcher_sees_every_moment_in_order_and_warns_once(tmp_path, stories_dir, hh_path):
    rec = Recorder()
    trainer = Trainer(load_config(raw=_raw(tmp_path / "run", stories_dir, hh_path, save_every=3)), progress=False,
                      watchers=[rec]).setup()
    result = trainer.train()
    assert rec.seen == [("start", 0), ("eval", 0, True), ("step", 1, True), ("eval", 2, True), ("step", 2, True),
                        ("save", "step-3"), ("step", 3, True), ("eval", 4, True), ("step", 4, True), ("end", 4)]
    warnings = [r for r in read_metrics(tmp_path / "run") if "warning" in r]
    assert warnings == [{"step": 1, "warning": "too_loud", "message": "first"}]
    assert result.notes == ["recorder: done"] and "recorder: done" in result.render()
    assert trainer.state.warnings == {"too_loud": "first"}


class StopAt(Watcher):
    def __init__(self, step, checkpoint=True):
        self.step, self.checkpoint = step, checkpoint

    def on_step(self, trainer, row):
        if trainer.state.step == self.step:
            trainer.request_stop("asked by a test", checkpoint=self.checkpoint)


def test_a_stop_request_checkpoints_and_resumes(tmp_path, stories_dir, hh_path):
    out = tmp_path / "run"
    trainer = Trainer(load_config(raw=_raw(out, stories_dir, hh_path)), progress=False, watchers=[StopAt(3)]).setup()
    with pytest.raises(TrainingStopped, match=r"stopped at step 3 of 4: asked by a test; resume with train.resume=auto"):
        trainer.train()
    assert [p.name for p in list_checkpoints(out)] == ["step-3"] and not (out / "final").exists()
    again = Trainer(load_config(raw=_raw(out, stories_dir, hh_path, resume="auto")), progress=False).setup()
    assert again.state.step == 3
    again.train()
    assert (out / "final").is_dir()


def test_the_cli_reports_a_stop_in_one_line_with_its_own_status(tmp_path, stories_dir, hh_path, monkeypatch, capsys):
    import yaml

    import orpo.train.trainer as trainer_mod

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path / "run", stories_dir, hh_path)))
    real_init = trainer_mod.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.watchers.append(StopAt(1, checkpoint=False))

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    assert main(["train", str(cfg), "train.eval_every=null", "data.eval_fraction=0"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "orpo train: stopped at step 1 of 4: asked by a test; no checkpoint was written"
