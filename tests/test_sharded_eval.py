"""Eval-time forwards under a sharding engine run on every rank the same number of times.

FSDP2 (and ZeRO-3) gather the weights collectively in every forward, so a forward that one rank
runs and the other does not waits forever. One torchrun launch (2 CPU processes, gloo, FSDP2)
with ``train.eval_generate`` (generation used to run on rank 0 only) and a ``data.general_eval``
of 5 blocks in batches of 2 (rank 0 holds 2 batches, rank 1 one); a hang fails at the timeout.
The perplexity equals a 1-process run's. Also: DPO's reference pass before ``engine.prepare``
runs on the model's device, not on ``accelerator.device`` (a sharding engine has not placed the
model yet).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY

from orpo.config import load_config
from orpo.train import Trainer, read_metrics
from orpo.train.health import general_blocks, read_general_text
from orpo.train.samples import read_samples

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = """
import json, sys
from orpo.config import load_config
from orpo.train import Trainer

Trainer(load_config(raw=json.loads(sys.argv[1])), progress=False).setup().train()
"""

DOCS = ["Once upon a time there was a little girl named Lily.", "She liked to play in the park with her dog.",
        "One day the sun was hot and the sky was blue.", "Tom had a big red ball and a small toy car.",
        "They were happy and went home to eat cake."]


def _raw(out: Path, stories_dir, hh_path, general: Path, **train) -> dict:
    return {"model": {"init": TINY, "tokenizer": str(stories_dir)},
            "data": {"train": str(hh_path), "max_length": 64, "max_samples": 10, "eval_fraction": 0.2,
                     "general_eval": str(general)},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "eval_batch_size": 2,
                      "learning_rate": 1e-3, "eval_generate": 2, "eval_generate_max_tokens": 6,
                      "save_final": False, **train}}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_eval_generate_and_general_eval_do_not_hang_under_fsdp2(tmp_path, stories_dir, hh_path, stories_tokenizer):
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    blocks = general_blocks(read_general_text(general), stories_tokenizer, 64)
    assert len(blocks) == 5  # rank 0: blocks 0, 2, 4 (2 batches of 2); rank 1: blocks 1, 3 (1 batch)

    one = _raw(tmp_path / "one", stories_dir, hh_path, general)
    Trainer(load_config(raw=one), progress=False).setup().train()

    two = _raw(tmp_path / "two", stories_dir, hh_path, general, distributed="fsdp2")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own process group, so that a hang's workers die with the launcher
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), json.dumps(two)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (they run in sessions of their own)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the 2-process FSDP2 run hung at an eval (a forward on one rank only)")
    assert proc.returncode == 0, stderr[-4000:]

    def evals(out: Path) -> list[dict]:
        return [r for r in read_metrics(out) if "eval_general_ppl" in r]

    got, want = evals(tmp_path / "two"), evals(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2]
    assert math.isclose(got[0]["eval_general_ppl"], want[0]["eval_general_ppl"], rel_tol=1e-5)
    samples = read_samples(tmp_path / "two")
    assert [s["step"] for s in samples] == [0, 0, 2, 2]  # written once, by rank 0


def test_dpo_reference_pass_runs_on_the_prepared_model_before_a_resume(tmp_path, stories_dir, hh_path, monkeypatch):
    """A sharding engine places the model itself: before ``engine.prepare`` it is whole, on the CPU,
    while the batches go to ``accelerator.device`` (a GPU). So the pass runs after prepare, on the
    model prepare returned, and before a checkpoint is loaded; its cache key is the hash of the
    weights before prepare. Read back from the calls, in order."""
    from orpo.train import checkpoint as ckpt
    from orpo.train import reference
    from orpo.train.distributed import Engine

    events: list[tuple] = []
    prepare, sums, load = Engine.prepare, reference.reference_sums, ckpt.load_checkpoint

    def prepare_spy(self, model, make_optimizer):
        out = prepare(self, model, make_optimizer)
        events.append(("prepare", out[0]))
        return out

    def sums_spy(model, dataset, layout, objective, batch_size, accelerator=None, keep_mode=None):
        events.append(("reference", model, accelerator.device))
        return sums(model, dataset, layout, objective, batch_size, accelerator, keep_mode)

    monkeypatch.setattr(Engine, "prepare", prepare_spy)
    monkeypatch.setattr(reference, "reference_sums", sums_spy)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda *a, **k: events.append(("load",)) or load(*a, **k))
    raw = {"model": {"init": TINY, "tokenizer": str(stories_dir)}, "orpo": {"objective": "dpo"},
           "data": {"train": str(hh_path), "max_length": 64, "max_samples": 5, "cache_dir": str(tmp_path / "cache")},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "save_every": 1}}
    Trainer(load_config(raw=raw), progress=False).setup().train()
    assert [e[0] for e in events] == ["prepare", "reference"]
    assert events[1][1] is events[0][1] and events[1][2] == torch.device("cpu")
    events.clear()
    for cache in (tmp_path / "cache").rglob("reference-*"):  # a cached pass is not run again
        shutil.rmtree(cache)
    raw["train"].update(max_steps=3, resume="auto")
    Trainer(load_config(raw=raw), progress=False).setup()
    assert [e[0] for e in events][:2] == ["prepare", "reference"] and events[-1] == ("load",)
