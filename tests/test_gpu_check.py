"""bench/gpu_check.sh --cpu-dry-run: every stage of the prepared GPU check runs (or is skipped with a
reason) on the CPU, so the script is known to work before a GPU lease is spent on it (~3 min)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["versions", "test_layouts_gpu", "single", "fsdp2", "fsdp2_lora", "fsdp2_cpu_offload",
          "fsdp2_cpu_offload_lora", "zero2", "zero2_lora", "zero3", "zero3_lora", "dpo_fsdp2",
          "eval_generate_fsdp2", "qlora"]
# what a CPU can run; the LoRA stages need stories260K (../shared, the stories_dir fixture)
CPU_STAGES = ["versions", "single", "fsdp2", "fsdp2_cpu_offload", "dpo_fsdp2", "eval_generate_fsdp2"]


def test_cpu_dry_run(tmp_path, stories_dir, hh_path):
    env = {**os.environ, "OUT": str(tmp_path), "SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "check.json").read_text())
    status = {r["stage"]: r["status"] for r in results}
    assert list(status) == STAGES, status
    assert not [s for s, v in status.items() if v in ("fail", "timeout")], (status, proc.stdout[-3000:])
    for stage in [*CPU_STAGES, "fsdp2_lora", "fsdp2_cpu_offload_lora"]:
        assert status[stage] == "pass", (stage, status)
    for r in results:
        if r["status"] == "skipped":
            assert r["reason"]
    assert proc.returncode == 0, proc.stdout[-3000:]


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_gets_what_is_left_of_the_budget_at_most(tmp_path, monkeypatch):
    """The check fits its lease: a stage is cut at the budget's end, and one with too little left is skipped."""
    import sys
    import time

    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)
    check = gpu_check.Check(tmp_path, dry=True, budget=3)
    t0 = time.monotonic()
    status, _ = check.sh([sys.executable, "-c", "import time; time.sleep(60)"], timeout=600)
    assert status == "timeout" and time.monotonic() - t0 < 10
    status, seconds = check.sh([sys.executable, "-c", "pass"], timeout=600)
    assert (status, seconds) == ("skipped", 0.0)
    row = check.record("late", status, seconds)
    assert row["reason"] == "over the check's 3 s budget"

