"""train.benchmark_tasks: lm-eval tasks on the live model during training (orpo.train.benchmarks).

The task is a local one (an include-path YAML): the rolling log-likelihood of a few TinyStories
paragraphs, the domain stories260K was trained on. lr 1e-3 on HH pairs drifts the model away from
it (docs/health.md: general perplexity 3.09 -> 4.51 in 5 steps), so the benchmark must see its
perplexity climb and the forgetting warning fire.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orpo.cli import main
from orpo.config import load_config
from orpo.report import write_report
from orpo.train import Trainer, read_metrics
from orpo.train.benchmarks import BENCH_FILE, read_results

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.",
    "One day, she saw a big red ball under a tree. She ran to the ball and picked it up.",
    "Tom was a small dog who liked to run. Every morning he ran to the big tree and back.",
    "One day he met a cat named Sam. Sam was sad because he lost his toy.",
    "They looked under the bed, behind the door and in the garden. At last they found the toy in a box.",
    "When the sun went down, they went home and had a yummy dinner with their mom and dad.",
]
TASK = "stories_ppl"
PPL = f"bench_{TASK}_word_perplexity"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """A folder with one local lm-eval task: loglikelihood_rolling over a JSONL of stories."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "stories.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in STORIES))
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "stories.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    }))
    return folder


def _raw(out, stories_dir, hh_path, tasks_dir, **train):
    return {
        "model": {"name_or_path": str(stories_dir), "dtype": "float32", "chat_template": "none"},
        "data": {"train": str(hh_path), "max_length": 96, "max_prompt_length": 48, "max_samples": 80,
                 "eval_fraction": 0.1},
        "train": {"output_dir": str(out), "batch_size": 8, "learning_rate": 1e-3, "max_steps": 6,
                  "eval_every": 3, "save_every": 3, "benchmark_tasks": [TASK], "benchmark_every": 3,
                  "benchmark_include_path": str(tasks_dir), **train},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories_dir, hh_path, tasks_dir):
    out = tmp_path_factory.mktemp("bench") / "run"
    trainer = Trainer(load_config(raw=_raw(out, stories_dir, hh_path, tasks_dir)), progress=False).setup()
    result = trainer.train()
    return trainer, result


def _bench_rows(out) -> list[dict]:
    return [r for r in read_metrics(out) if PPL in r]


def test_benchmarks_run_at_step_0_every_n_and_before_final(run):
    trainer, result = run
    rows = _bench_rows(trainer.output_dir)
    assert [r["step"] for r in rows] == [0, 3, 6]
    for r in rows:
        assert r[PPL] > 1 and r[f"bench_{TASK}_bits_per_byte"] > 0 and r["bench_seconds"] > 0
        assert "loss" not in r and "eval_loss" not in r
    # lm-eval's own results of each run, a line per run: the same numbers, the documents it scored
    runs = read_results(trainer.output_dir)
    assert [r["step"] for r in runs] == [0, 3, 6]
    for r, row in zip(runs, rows, strict=True):
        assert r["lm_eval"]["results"][TASK]["word_perplexity,none"] == pytest.approx(row[PPL], rel=1e-9)
        assert r["lm_eval"]["n-samples"][TASK]["effective"] == len(STORIES)
    assert any(line.startswith("benchmarks     step 6") for line in result.notes)


def test_forgetting_warns_when_a_benchmark_gets_worse_than_at_step_0(run):
    trainer, result = run
    rows = _bench_rows(trainer.output_dir)
    assert rows[-1][PPL] > 1.1 * rows[0][PPL], rows  # perplexity: higher is worse
    assert "forgetting" in result.warnings and PPL in result.warnings["forgetting"]
    state = trainer.state.watchers["benchmarks"]
    assert state["baseline"][PPL] == rows[0][PPL] and state["higher_is_better"][PPL] is False
    saved = json.loads((trainer.output_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert saved["watchers"]["benchmarks"]["baseline"][PPL] == rows[0][PPL]


def test_the_model_card_lists_step_0_and_the_final_numbers(run):
    trainer, _ = run
    card = (trainer.output_dir / "final" / "README.md").read_text()
    rows = _bench_rows(trainer.output_dir)
    assert "## Benchmarks" in card and f"`{TASK}` {len(STORIES)}" in card
    line = next(x for x in card.splitlines() if x.startswith(f"| {TASK}_word_perplexity |"))
    first, last = (float(c) for c in line.split("|")[2:4])
    assert first == pytest.approx(rows[0][PPL], abs=1e-3) and last == pytest.approx(rows[-1][PPL], abs=1e-3)


def test_the_final_numbers_are_the_saved_models(run, tasks_dir, capsys):
    """The last benchmark ran on the model final/ holds: `orpo benchmark final/` gives the same numbers."""
    trainer, _ = run
    capsys.readouterr()
    assert main(["benchmark", str(trainer.output_dir / "final"), "--tasks", TASK, "--include-path", str(tasks_dir),
                 "--chat-template", "none", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    last = _bench_rows(trainer.output_dir)[-1]
    assert row[f"{TASK}_word_perplexity"] == pytest.approx(last[PPL], rel=1e-6)
    assert row[f"{TASK}_bits_per_byte"] == pytest.approx(last[f"bench_{TASK}_bits_per_byte"], rel=1e-6)


def test_report_plots_the_benchmarks(run, tmp_path):
    trainer, _ = run
    page = write_report([trainer.output_dir], tmp_path / "report")
    assert (tmp_path / "report" / "benchmarks.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())[0]["benchmarks"]
    rows = _bench_rows(trainer.output_dir)
    assert summary["first_step"] == 0 and summary["step"] == 6
    assert summary[PPL]["first"] == rows[0][PPL] and summary[PPL]["final"] == rows[-1][PPL]
    assert "Benchmarks" in page.read_text()


def test_resume_keeps_the_step_0_baseline_and_the_earlier_results(run, tmp_path, stories_dir, hh_path, tasks_dir):
    """A run killed after step 3 and resumed: no second baseline, the same warning, benchmarks.jsonl cut to step 3."""
    import shutil

    trainer, _ = run
    out = tmp_path / "resumed"
    shutil.copytree(trainer.output_dir, out, symlinks=True)
    shutil.rmtree(out / "checkpoints" / "step-6", ignore_errors=True)
    # killed while appending a line: its start is on disk
    with (out / BENCH_FILE).open("a") as f:
        f.write('{"step": 7, "seconds": 1.0, "lm_e')
    raw = _raw(out, stories_dir, hh_path, tasks_dir, resume="auto")
    resumed = Trainer(load_config(raw=raw), progress=False).setup()
    assert resumed.state.step == 3
    resumed.train()
    steps = [r["step"] for r in read_results(out)]
    assert steps == [0, 3, 6]
    assert resumed.state.watchers["benchmarks"]["baseline"] == trainer.state.watchers["benchmarks"]["baseline"]
    assert "forgetting" in resumed.state.warnings


def test_a_task_lm_eval_does_not_know_stops_the_run_before_the_folder_is_touched(tmp_path, stories_dir, hh_path,
                                                                                  tasks_dir, capsys):
    raw = _raw(tmp_path / "run", stories_dir, hh_path, tasks_dir, benchmark_tasks=["no_such_task_xyz"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_task_xyz" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_benchmark_every_needs_tasks(tmp_path, stories_dir, hh_path, tasks_dir):
    with pytest.raises(Exception, match="benchmark_every is when train.benchmark_tasks run"):
        load_config(raw=_raw(tmp_path, stories_dir, hh_path, tasks_dir, benchmark_tasks=[]))
    with pytest.raises(Exception, match="benchmark_limit"):
        load_config(raw=_raw(tmp_path, stories_dir, hh_path, tasks_dir, benchmark_limit=2.5))


def test_benchmark_limit_caps_the_documents_lm_eval_scores(tmp_path, stories_dir, hh_path, tasks_dir):
    raw = _raw(tmp_path / "run", stories_dir, hh_path, tasks_dir, max_steps=1, benchmark_every=None,
               benchmark_limit=2, eval_every=None, save_every=None)
    trainer = Trainer(load_config(raw=raw), progress=False).setup()
    trainer.train()
    runs = read_results(trainer.output_dir)
    assert [r["step"] for r in runs] == [0, 1]
    assert all(r["lm_eval"]["n-samples"][TASK]["effective"] == 2 for r in runs)
    assert trainer.state.watchers["benchmarks"]["docs"] == {TASK: 2}


SCRIPT = """
import json, sys
from orpo.config import load_config
from orpo.train import train
train(load_config(raw=json.loads(sys.argv[1])), progress=False)
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_benchmark_like_one(tmp_path, stories_dir, hh_path, tasks_dir):
    """Every rank runs the whole task (no rank waits in a collective the other skipped); the numbers equal
    a one-process run's with the same global batch."""
    from tiny import TINY

    def raw(out, batch_size):
        r = _raw(out, stories_dir, hh_path, tasks_dir, max_steps=2, batch_size=batch_size, benchmark_every=1,
                 eval_every=None, save_every=None, eval_batch_size=1)
        r["model"] = {"init": TINY, "tokenizer": str(stories_dir)}
        r["data"] = {**r["data"], "max_length": 64, "max_samples": 10, "eval_fraction": 0.2}
        return r

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(raw(tmp_path / "ddp", 2))], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    Trainer(load_config(raw=raw(tmp_path / "one", 4)), progress=False).setup().train()
    ddp, one = _bench_rows(tmp_path / "ddp"), _bench_rows(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [0, 1, 2]
    for a, b in zip(ddp, one, strict=True):
        assert a[PPL] == pytest.approx(b[PPL], rel=1e-4)
    assert [r["step"] for r in read_results(tmp_path / "ddp")] == [0, 1, 2]
    assert (tmp_path / "ddp" / BENCH_FILE).read_text().count("\n") == 3


def test_benchmark_max_new_tokens_caps_what_lm_eval_generates(tmp_path, stories_dir, hh_path, tasks_dir):
    """Read back from lm-eval's own record of the task it ran: ifeval's max_gen_toks (1280) cut to 4."""
    raw = _raw(tmp_path / "run", stories_dir, hh_path, tasks_dir, max_steps=1, benchmark_every=None,
               benchmark_limit=2, benchmark_max_new_tokens=4, benchmark_tasks=["ifeval"], eval_every=None,
               save_every=None)
    trainer = Trainer(load_config(raw=raw), progress=False).setup()
    trainer.train()
    runs = read_results(trainer.output_dir)
    assert [r["step"] for r in runs] == [0, 1]
    for r in runs:
        assert r["lm_eval"]["configs"]["ifeval"]["generation_kwargs"]["max_gen_toks"] == 4
        assert r["lm_eval"]["n-samples"]["ifeval"]["effective"] == 2
