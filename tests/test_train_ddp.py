"""Two CPU processes (torchrun, gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import TINY

from orpo.config import load_config
from orpo.train import Trainer, read_metrics

SCRIPT = """
import atexit, json, os, sys
def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    # one write(2) per rank, so the ranks' lines never interleave (PYTHONUNBUFFERED makes print write in parts)
    os.write(1, f"gloo threads at exit: {[n for n in names if 'gloo' in n]}\\n".encode())
# registered before orpo's own exit handler, so it runs after it (atexit is last in, first out)
atexit.register(gloo_threads)
from orpo.config import load_config
from orpo.train import train
train(load_config(raw=json.loads(sys.argv[1])), progress=False)
"""


def _raw(out, stories_dir, hh_path, batch_size):
    return {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        # general_eval: 3 blocks of 64 tokens, so the ranks score different numbers of blocks (2 and 1)
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 10, "eval_fraction": 0.2,
                 "general_eval": str(out.parent / "general.txt")},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": batch_size, "eval_batch_size": 1,
                  "learning_rate": 1e-3, "save_every": 2},
    }


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.usefixtures("one_thread")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, stories_dir, hh_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    (tmp_path / "general.txt").write_text("Once upon a time, there was a little girl named Lily. " * 9)
    raw = _raw(tmp_path / "ddp", stories_dir, hh_path, batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(raw)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The process group ended by orpo on both ranks, its threads joined: left to interpreter teardown,
    # a gloo thread still releasing a collective's tensors aborted about 1 run in 10 (SIGABRT).
    assert proc.stdout.count("gloo threads at exit: []") == 2, proc.stdout[-2000:]

    Trainer(load_config(raw=_raw(tmp_path / "one", stories_dir, hh_path, batch_size=4)), progress=False).setup().train()

    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [0, 1, 2, 3, 3]
    assert "eval_general_ppl" in ddp[0]  # all-reduced over ranks: compared below like every metric
    for a, b in zip(ddp, one, strict=True):
        for key, value in b.items():
            if key in ("tokens_per_s", "step"):
                continue
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert {p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-2").glob("rng_state_*.pt")} == {
        "rng_state_0.pt", "rng_state_1.pt"}
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
