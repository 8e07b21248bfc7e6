"""The README's main job, as `make demo` runs it: alignment must visibly happen (about 60 s)."""

from __future__ import annotations

from pathlib import Path

from orpo.cli import main
from orpo.train import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_learns_the_preference(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "quickstart"
    assert main(["train", "examples/quickstart.yaml", f"train.output_dir={out}", "train.save_every=null"]) == 0
    evals = [r for r in read_metrics(out) if "eval_accuracy" in r]
    first, mid, last = evals[0], evals[1], evals[-1]
    assert first["step"] == 0 and last["step"] == 800
    assert first["eval_accuracy"] < 0.6 and last["eval_accuracy"] >= 0.9
    assert last["eval_log_odds_ratio"] > first["eval_log_odds_ratio"] + 3
    # past the first eval (a fresh model first learns the data's language), chosen rises, rejected falls
    assert last["eval_logps_chosen"] > mid["eval_logps_chosen"]
    assert last["eval_logps_rejected"] < mid["eval_logps_rejected"]
    assert (out / "final" / "model.safetensors").is_file()
    # the healthy reference run: no run-health warning (tests/test_health.py triggers each one)
    assert [r for r in read_metrics(out) if "warning" in r] == []
