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
