"""`orpo sweep`: the grid, one subfolder per run, the table (markdown + JSON), failures recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orpo.cli import main
from orpo.config import ConfigError
from orpo.sweep import parse_grid, run_name, split_values
from orpo.train import read_metrics

REPO = Path(__file__).resolve().parents[1]
# The quickstart, made quick: 4 steps, evals at 0, 2, 4 on 20 held-out pairs, no checkpoints.
QUICK = ["train.max_steps=4", "train.eval_every=2", "train.save_every=null", "data.eval=null",
         "data.eval_fraction=0.05", "data.max_samples=400"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_values_split_on_commas_outside_brackets_and_quotes():
    assert split_values("0.1,0.2, 0.5") == ["0.1", "0.2", "0.5"]
    assert split_values("[q_proj, v_proj],all-linear") == ["[q_proj, v_proj]", "all-linear"]
    assert split_values("'a,b',{x: 1, y: 2}") == ["'a,b'", "{x: 1, y: 2}"]
    swept, fixed = parse_grid(["orpo.beta=0.1,0.2", "train.max_steps=5", "model.lora.target_modules=[a, b]"])
    assert swept == {"orpo.beta": ["0.1", "0.2"]} and fixed == ["train.max_steps=5", "model.lora.target_modules=[a, b]"]
    for bad, msg in ((["train.max_steps=5"], "nothing to sweep"), (["orpo.beta"], "not of the form"),
                     (["orpo.beta=0.1,"], "empty value"), (["train.output_dir=a,b"], "cannot be swept"),
                     (["orpo.beta=1,2", "orpo.beta=3,4"], "swept twice")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)
    assert run_name({"orpo.beta": "0.1", "train.learning_rate": "1e-3"}) == "beta-0.1_learning_rate-1e-3"
    assert run_name({"model.lora.r": "8", "data.r": "2"}) == "model.lora.r-8_data.r-2"  # same last part: whole key
    assert run_name({"model.lora.target_modules": "[q, v]"}) == "target_modules-q+v"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 x 2: λ in {0.5, 1.0}, lr in {5e-3, 1e9}; the 1e9 runs diverge (a failed run must not stop the sweep)."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the quickstart's paths are relative to the repository root
    try:
        code = main(["sweep", "examples/quickstart.yaml", "orpo.beta=0.5,1.0", "train.learning_rate=5e-3,1e9",
                     *QUICK, "train.max_bad_steps=1", f"train.output_dir={out}"])
    finally:
        os.chdir(cwd)
    return out, code


def test_a_2x2_sweep_runs_every_point_in_its_own_folder(sweep):
    out, code = sweep
    assert code == 1  # some runs failed; the table says which
    names = {"beta-0.5_learning_rate-5e-3", "beta-1.0_learning_rate-5e-3", "beta-0.5_learning_rate-1e9",
             "beta-1.0_learning_rate-1e9"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == names | {"sweep", "report"}
    for name in names:
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        beta, lr = name.removeprefix("beta-").split("_learning_rate-")
        assert cfg["orpo"]["beta"] == float(beta) and cfg["train"]["learning_rate"] == float(lr)
        assert cfg["train"]["max_steps"] == 4 and cfg["data"]["eval_fraction"] == 0.05  # fixed overrides pass through
        assert cfg["train"]["output_dir"] == str(out / name)


def test_the_table_has_final_and_best_metrics_sorted_and_failures(sweep):
    out, _ = sweep
    data = json.loads((out / "sweep" / "sweep.json").read_text())
    runs = data["runs"]
    assert data["swept"] == {"orpo.beta": ["0.5", "1.0"], "train.learning_rate": ["5e-3", "1e9"]}
    assert [r["status"] for r in runs] == ["ok", "ok", "failed", "failed"]
    ok = runs[:2]
    assert ok[0]["final"]["eval_loss"] <= ok[1]["final"]["eval_loss"]  # sorted by final eval_loss, lowest first
    for r in ok:
        evals = [row for row in read_metrics(r["output_dir"]) if "eval_loss" in row]
        assert r["steps"] == 4 and r["final"]["step"] == 4
        assert r["final"]["eval_accuracy"] == evals[-1]["eval_accuracy"]
        low = min(evals, key=lambda row: row["eval_loss"])
        assert r["best"]["eval_loss"] == {"value": low["eval_loss"], "step": low["step"]}
        high = max(e["eval_accuracy"] for e in evals)
        assert r["best"]["eval_accuracy"]["value"] == high
        assert (Path(r["output_dir"]) / "final" / "README.md").is_file()
    for r in runs[2:]:
        assert r["error"].startswith("TrainingDiverged: training diverged") and r["values"]["train.learning_rate"] == "1e9"
    md = (out / "sweep" / "sweep.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| beta-")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [r["name"] for r in runs]
    assert "failed: TrainingDiverged" in rows[2] and "Runs finished: 4 of 4" in md
    assert "final eval_loss" in md and "best eval_accuracy (step)" in md


def test_the_report_covers_every_run_that_wrote_metrics(sweep):
    out, _ = sweep
    runs = json.loads((out / "sweep" / "sweep.json").read_text())["runs"]
    ran = [r["name"] for r in runs if (Path(r["output_dir"]) / "metrics.jsonl").is_file()]
    assert len(ran) >= 2  # the two runs that finished, and any failed one that logged a step
    assert (out / "report" / "report.html").is_file()
    summaries = json.loads((out / "report" / "summary.json").read_text())
    assert sorted(s["name"] for s in summaries) == sorted(ran)


def test_stop_on_failure_leaves_the_rest_pending(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "stop"
    code = main(["sweep", "examples/quickstart.yaml", "train.learning_rate=1e9,5e-3", *QUICK, "train.max_bad_steps=1",
                 f"train.output_dir={out}", "--stop-on-failure", "--sort", "eval_accuracy"])
    assert code == 1
    runs = json.loads((out / "sweep" / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["status"]) for r in runs] == [("learning_rate-1e9", "failed"), ("learning_rate-5e-3", "pending")]
    assert not (out / "learning_rate-5e-3").exists()
    printed = capsys.readouterr().out
    assert "| learning_rate-1e9 | 1e9 | failed: TrainingDiverged" in printed and "final eval_accuracy" in printed


def test_a_bad_grid_point_fails_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "bad"
    assert main(["sweep", "examples/quickstart.yaml", "train.lr_scheduler=linear,bogus", *QUICK,
                 f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "run lr_scheduler-bogus" in err and "train.lr_scheduler" in err
    assert not out.exists()
    assert main(["sweep", "examples/quickstart.yaml", "orpo.beta=0.1,0.2", "--sort", "eval_pairs"]) == 2
    assert main(["sweep", "examples/quickstart.yaml", "orpo.beta=0.1,0.2", *QUICK, f"train.output_dir={out}",
                 "--dry-run"]) == 0
    listed = yaml.safe_load(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["beta-0.1", "beta-0.2"] and not out.exists()
