"""``orpo benchmark``: lm-eval on the model orpo loads (orpo.harness), checked against orpo's own numbers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from orpo.cli import main

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs_file(hh_path: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "hh60.jsonl"
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(60)))
    return path


def _json(capsys) -> list[dict]:
    return json.loads(capsys.readouterr().out)


def test_the_two_choice_task_scores_as_orpo_eval(stories_dir: Path, pairs_file: Path, capsys):
    """lm-eval's log-likelihood path and orpo's packed one agree on which response is likelier per token."""
    common = ["--max-length", "512", "--chat-template", "none", "--json"]
    assert main(["eval", "--model", str(stories_dir), "--data", str(pairs_file), *common]) == 0
    (ours,) = _json(capsys)
    assert main(["benchmark", str(stories_dir), "--pairs", str(pairs_file), *common]) == 0
    (row,) = _json(capsys)
    assert row["pairs_acc_per_token"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert 0 < row["pairs_acc_stderr"] < 0.2


def test_ifeval_scores_the_shipped_prompts_offline(stories_dir: Path, shared_dir: Path, tmp_path: Path, capsys):
    from orpo.harness.ifeval import PROMPTS

    assert PROMPTS.read_bytes() == (shared_dir / "data" / "ifeval" / "input_data.jsonl").read_bytes()
    out = tmp_path / "bench"
    assert main(["benchmark", str(stories_dir), "--tasks", "ifeval", "--limit", "8", "--max-new-tokens", "16",
                 "--out", str(out), "--json"]) == 0
    (row,) = _json(capsys)
    for metric in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc"):
        assert 0.0 <= row[f"ifeval_{metric}"] <= 1.0
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["rows"] == [row]
    raw = json.loads((out / summary["files"][str(stories_dir)]).read_text())
    assert raw["n-samples"]["ifeval"]["effective"] == 8
    assert raw["results"]["ifeval"]["prompt_level_strict_acc,none"] == row["ifeval_prompt_level_strict_acc"]


@pytest.mark.parametrize("args", [["--tasks", "no_such_task_xyz"], [], ["--pairs", "missing.jsonl"]])
def test_bad_input_exits_2_before_any_model_loads(args, tmp_path: Path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", str(tmp_path / "no_model_here"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    assert not out.exists()
