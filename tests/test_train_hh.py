"""The done-when run of the trainer issue, as written: `orpo train` with the issue's config
(examples/hh-stories260k.yaml: stories260K on 1,800 HH harmless pairs, max_length 512, chat
template none, batch 8, 30 steps, lr 8e-6). Every loss and gradient norm must stay finite; TRL's
ORPO went NaN from step 3 on this setup (see ../shared/notes/anchors.md). About 80 s on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path

from orpo.cli import main
from orpo.train import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_issue_config_runs_30_finite_steps(tmp_path, monkeypatch, stories_dir, hh_path, capsys):
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository root
    out = tmp_path / "hh"
    assert main(["train", "examples/hh-stories260k.yaml", f"train.output_dir={out}"]) == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        for key in ("loss", "nll_loss", "or_loss", "log_odds_ratio", "logps_chosen", "logps_rejected", "grad_norm"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert r["skipped_steps"] == 0
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert all(math.isfinite(r["eval_loss"]) and r["eval_pairs"] == 90 for r in evals)
    assert (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-30"]
    err = capsys.readouterr().err
    assert "dropped" in err and "empty response: 4" in err  # the summary says what went and why
