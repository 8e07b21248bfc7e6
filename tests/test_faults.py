"""The short fault suite (`make faults` runs the full one): 3 SIGKILLs (one at a random moment of a
random step, one inside a checkpoint write before its manifest, one inside the final save), 1 SIGTERM
and 1 damaged checkpoint, each followed by a restart with train.resume: auto; the final weights must
equal an uninterrupted run's bit for bit (fp32, CPU, one thread)."""

from __future__ import annotations

import pytest
from faults.run import FaultSuite


@pytest.mark.usefixtures("one_thread", "stories_dir", "hh_path")
def test_killed_stopped_and_damaged_runs_end_with_the_uninterrupted_weights(tmp_path):
    result = FaultSuite(tmp_path / "faults", seed=0, short=True, in_process=True, log=lambda line: None).run()
    assert result["problems"] == []
    assert result["kills"] == 3 and set(result["kills_by_where"]) == {
        "during training", "inside write: ckpt-manifest", "inside write: final-publish"}
    assert result["sigterms"] == result["sigterm_exit_4_with_checkpoint"] == 1
    assert result["damaged_checkpoints"] == result["damaged_detected"] == 1
    assert result["resumes"] >= 3
    assert result["max_abs_diff"] == 0.0 and result["metrics_identical"]
