"""FSDP2 on two CPU processes (torchrun, gloo) trains like one process with the same global batch,
and its sharded checkpoints resume on one process or two.

Two torchrun launches in all (each costs a few seconds of imports per process): one run that fails
on rank 1 after its step-2 checkpoint (every rank must stop, with rank 1's message), then one
launch that trains several configurations in a row: FSDP2 uninterrupted, LoRA under FSDP2, and
resumes of the failed run's 2-process checkpoint and of a 1-process checkpoint. The one-process
references and the 2 -> 1 resume run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY

from orpo.config import load_config
from orpo.train import Trainer, list_checkpoints, read_metrics

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.usefixtures("one_thread"),
]

SCRIPT = """
import json, sys
from orpo.config import load_config
from orpo.train import Trainer

for raw in json.loads(sys.argv[1]):
    fail, facts = raw.pop("fail", None), raw.pop("facts", None)

    def hook(trainer, fail=fail):
        if fail and trainer.state.step == fail["step"] and trainer.accelerator.process_index == fail["rank"]:
            raise RuntimeError(f"injected failure on rank {fail['rank']} after step {fail['step']}")

    trainer = Trainer(load_config(raw=raw), progress=False, on_step_end=hook).setup()
    if facts and trainer.accelerator.is_main_process:  # what the built model is, read back from it
        from torch.distributed.fsdp import FSDPModule
        model = trainer.model
        group = model._get_fsdp_state()._fsdp_param_group
        with open(facts, "w") as f:
            json.dump({"units": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
                       "offload": type(group.offload_policy).__name__,
                       "param": type(next(model.parameters())).__name__,
                       "checkpointing": model.is_gradient_checkpointing}, f)
    trainer.train()
"""

STEPS = 5
# Losses of the same global batch on 1 and 2 processes differ only by float summation order.
REL = 1e-5


def _raw(out, model, hh_path, batch_size, lora=False, **train):
    model = dict(model)
    if lora:
        model["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}  # no dropout: its masks depend on the rank
    return {
        "model": model,
        # 8 training pairs: whole global micro-batches of 4 on 1 and 2 processes; 2 eval pairs in one
        # batch, so rank 1 has no eval batch of its own (it must still run the forward, in lockstep).
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 10, "eval_fraction": 0.2},
        "train": {"output_dir": str(out), "max_steps": STEPS, "batch_size": batch_size, "eval_batch_size": 2,
                  "learning_rate": 1e-3, "save_every": 2, "save_total_limit": 3, **train},
    }


def _torchrun(tmp_path: Path, runs: list[dict], expect_ok: bool = True) -> subprocess.CompletedProcess:
    script = tmp_path / "runs.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(runs)], env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _train_here(raw: dict) -> Trainer:
    trainer = Trainer(load_config(raw=raw), progress=False).setup()
    trainer.train()
    return trainer


def _assert_same_run(out: Path, ref: Path, weights: str = "model.safetensors", weights_rel: float = REL) -> None:
    """Same metrics rows (step for step, train and eval) to 1e-5, and the same final weights."""
    rows, ref_rows = read_metrics(out), read_metrics(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(rows, ref_rows, strict=True):
        assert set(a) == set(b)
        for key, value in b.items():
            if key in ("tokens_per_s", "step") or value is None:
                continue
            # log-odds ratios and margins are differences of nearly equal log-probs: compare absolutely
            tol = 1e-5 if "log_odds" in key or "margin" in key else 1e-7
            assert a[key] == pytest.approx(value, rel=REL, abs=tol), (a["step"], key, a[key], value)
    final, ref_final = load_file(str(out / "final" / weights)), load_file(str(ref / "final" / weights))
    assert final.keys() == ref_final.keys()
    for k, w in ref_final.items():
        diff = (final[k] - w).abs().max().item()
        assert diff <= weights_rel * w.abs().max().item() + 1e-6, (k, diff, w.abs().max().item())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories_dir, hh_path):
    """Every run of this module, each once: two torchrun launches and the in-process ones."""
    root = tmp_path_factory.mktemp("dist")
    tiny = {"init": TINY, "tokenizer": str(stories_dir)}
    stories = {"name_or_path": str(stories_dir), "chat_template": "chatml"}

    # 1 process, global micro-batch 4: the references.
    _train_here(_raw(root / "one", tiny, hh_path, batch_size=4))
    _train_here(_raw(root / "one-lora", stories, hh_path, batch_size=4, lora=True))

    # 2 processes, FSDP2, rank 1 fails after step 3 (the last checkpoint is step 2).
    failed = _raw(root / "failed", tiny, hh_path, batch_size=2, distributed="fsdp2")
    proc = _torchrun(root, [{**failed, "fail": {"rank": 1, "step": 3}}], expect_ok=False)

    # Copies of the failed run, resumed on 1 process (here) and on 2 (below); a copy of the
    # 1-process reference cut back to its step-2 checkpoint, resumed on 2 processes.
    for name in ("2to1", "2to2"):
        shutil.copytree(root / "failed", root / name)
    shutil.copytree(root / "one", root / "1to2")
    shutil.rmtree(root / "1to2" / "final")
    for later in list_checkpoints(root / "1to2")[1:]:
        shutil.rmtree(later)
    _train_here(_raw(root / "2to1", tiny, hh_path, batch_size=4, resume="auto"))

    _torchrun(root, [
        _raw(root / "fsdp2", tiny, hh_path, batch_size=2, distributed="fsdp2"),
        _raw(root / "fsdp2-lora", stories, hh_path, batch_size=2, lora=True, distributed="fsdp2"),
        _raw(root / "2to2", tiny, hh_path, batch_size=2, distributed="fsdp2", resume="auto"),
        _raw(root / "1to2", tiny, hh_path, batch_size=2, distributed="fsdp2", resume="auto"),
        {**_raw(root / "offload", {**tiny, "gradient_checkpointing": True}, hh_path, batch_size=2,
                distributed="fsdp2", cpu_offload=True, max_steps=1, save_every=None),
         "facts": str(root / "offload.json")},
    ])
    return root, proc


def test_fsdp2_on_two_processes_matches_one_process(runs):
    root, _ = runs
    _assert_same_run(root / "fsdp2", root / "one")
    ckpt = root / "fsdp2" / "checkpoints" / "step-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["engine"], state["num_processes"]) == ("fsdp2", 2)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    # every rank wrote its own shard, and the manifest lists every rank's files
    assert {"state/__0_0.distcp", "state/__1_0.distcp", "state/.metadata", "rng_state_0.pt",
            "rng_state_1.pt"} <= set(manifest["files"])


def test_lora_under_fsdp2_matches_one_process(runs):
    root, _ = runs
    # Adam's update of an element whose gradient is near its eps (LoRA's A and B start with zero
    # gradients) turns float summation order into larger weight differences: one process with
    # grad_accum 2 x batch 2 and with batch 4 (the same global batch) already differ by 5.8e-5 of
    # the adapter's scale (measured), so the adapter is held to 1e-4 of scale; the losses to 1e-5.
    _assert_same_run(root / "fsdp2-lora", root / "one-lora", weights="adapter_model.safetensors", weights_rel=1e-4)
    assert not (root / "fsdp2-lora" / "final" / "model.safetensors").exists()


def test_an_error_on_one_rank_stops_every_rank_with_its_message(runs):
    root, proc = runs
    assert proc.returncode != 0
    assert "injected failure on rank 1 after step 3" in proc.stderr
    assert [p.name for p in list_checkpoints(root / "failed")] == ["step-2"]
    assert not (root / "failed" / "final").exists()


@pytest.mark.parametrize("name", ["2to1", "2to2", "1to2"])
def test_sharded_checkpoints_resume_on_another_process_count(runs, name):
    """Written by 2 processes (FSDP2) or 1, resumed by 1 (no sharding) or 2 (FSDP2), with the
    batch size scaled to keep the global batch: the losses continue those of the one run."""
    root, _ = runs
    _assert_same_run(root / name, root / "one")


def test_fsdp2_wraps_each_decoder_layer_with_the_configured_offload_and_checkpointing(runs):
    root, _ = runs
    facts = json.loads((root / "offload.json").read_text())
    assert sum("LlamaDecoderLayer" in u for u in facts["units"]) == 2 and "LlamaForCausalLM" in facts["units"][0]
    assert facts["offload"] == "CPUOffloadPolicy"  # train.cpu_offload
    assert facts["checkpointing"] is True  # model.gradient_checkpointing
    assert facts["param"] == "DTensor"
    assert (root / "offload" / "final" / "model.safetensors").is_file()
