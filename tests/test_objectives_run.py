"""Every objective through the real trainer on HH pairs: the metric keys in metrics.jsonl, and DPO's
reference pass (the starting weights, cached beside the tokenized data, untouched by a resume)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import TINY

from orpo.config import load_config
from orpo.train import ResumeError, Trainer, read_metrics
from orpo.train import reference as reference_mod
from orpo.train.objective import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]

SHARED = {"loss", "nll_loss", "logps_chosen", "logps_rejected", "accuracy", "margin", "log_odds_ratio"}
OWN = {"orpo": {"or_loss"}, "sft": set(), "simpo": {"simpo_loss"}, "cpo": {"cpo_loss"},
       "dpo": {"dpo_loss", "reward_margin"}}


def _cfg(out, stories_dir, hh_path, objective, **train):
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12, "eval_fraction": 0.25},
        "orpo": {"objective": objective},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 3, "learning_rate": 1e-2,
                  "eval_every": 2, **train},
    })


@pytest.mark.parametrize("objective", ["orpo", "sft", "simpo", "cpo", "dpo"])
def test_each_objective_trains_two_steps_and_logs_its_metrics(tmp_path, stories_dir, hh_path, objective):
    Trainer(_cfg(tmp_path / "run", stories_dir, hh_path, objective), progress=False).setup().train()
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and [r["step"] for r in eval_rows] == [0, 2]
    expected = SHARED | OWN[objective]
    others = set().union(*OWN.values()) - OWN[objective]
    for r in train_rows:
        assert expected <= set(r) and not others & set(r), objective
        assert all(math.isfinite(r[k]) for k in expected)
    for r in eval_rows:
        assert {f"eval_{k}" for k in expected} <= set(r)
    terms = build_objective(load_config(raw={"model": {"init": TINY, "tokenizer": "x"}, "data": {"train": "x"},
                                             "orpo": {"objective": objective}}).orpo).terms
    # the logged loss is the weighted sum of the logged terms
    for r in train_rows:
        assert r["loss"] == pytest.approx(sum(t.weight * r[t.name] for t in terms), rel=1e-6)
    if objective == "dpo":
        # the reference is the starting weights: at step 0 every pair costs exactly log 2
        assert eval_rows[0]["eval_dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
        assert eval_rows[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)
        assert eval_rows[1]["eval_dpo_loss"] != pytest.approx(math.log(2.0), abs=1e-4)


def test_dpo_reference_is_cached_and_a_resume_reads_the_starting_weights(tmp_path, stories_dir, hh_path,
                                                                         monkeypatch):
    out = tmp_path / "run"
    first = Trainer(_cfg(out, stories_dir, hh_path, "dpo", save_every=1), progress=False).setup()
    cached = list(first.data.cache_path.glob("reference-*"))
    assert len(cached) == 1 and (cached[0] / "logps.safetensors").is_file()
    ref_train = list(first.train_data["ref_chosen_sum"])
    assert len(ref_train) == len(first.train_data) and all(v < 0 for v in ref_train)
    first.train()

    def no_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran again instead of reading the cache")

    monkeypatch.setattr(reference_mod, "reference_sums", no_pass)
    again = Trainer(_cfg(out, stories_dir, hh_path, "dpo", max_steps=3, resume="auto"), progress=False).setup()
    assert again.state.step == 2  # resumed: the model now holds trained weights ...
    assert list(again.train_data["ref_chosen_sum"]) == ref_train  # ... but the reference is the start's
    assert list(again.eval_data["ref_rejected_sum"]) == list(first.eval_data["ref_rejected_sum"])

    # another objective cannot continue this run
    with pytest.raises(ResumeError, match="orpo.objective"):
        Trainer(_cfg(out, stories_dir, hh_path, "sft", max_steps=3, resume="auto"), progress=False).setup()


def test_the_weights_fingerprint_sees_one_changed_weight(stories_dir, stories_tokenizer):
    from orpo.train.model import ensure_pad_token, load_model

    ensure_pad_token(stories_tokenizer)
    cfg = load_config(raw={"model": {"init": TINY, "tokenizer": str(stories_dir)}, "data": {"train": "x"}})
    model = load_model(cfg.model, stories_tokenizer, seed=0)
    before = reference_mod.weights_fingerprint(model)
    assert reference_mod.weights_fingerprint(load_model(cfg.model, stories_tokenizer, seed=0)) == before
    with torch.no_grad():
        w = next(model.parameters())
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(math.inf))
    assert reference_mod.weights_fingerprint(model) != before


def test_the_sft_vs_orpo_example_config_validates_for_every_run(shared_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_vs_orpo", REPO / "examples" / "sft_vs_orpo" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    names = []
    for run in [*example.DEFAULT_RUNS, "cpo", "dpo:0.5"]:
        name, overrides = example.run_overrides(run)
        cfg = load_config(REPO / "examples" / "sft_vs_orpo" / "config.yaml", overrides)
        names.append(name)
        assert cfg.orpo.objective == run.split(":")[0] and cfg.train.eval_generate > 0
    assert names == ["sft", "orpo-0.1", "orpo-1.0", "orpo-10", "simpo", "dpo", "cpo", "dpo-0.5"]
    assert load_config(REPO / "examples" / "sft_vs_orpo" / "config.yaml",
                       example.run_overrides("orpo:1.0")[1]).orpo.beta == 1.0


DDP_SCRIPT = """
import json, sys
from orpo.config import load_config
from orpo.train import train
train(load_config(raw=json.loads(sys.argv[1])), progress=False)
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_dpo_and_eval_samples_under_two_processes_match_one_process(tmp_path, stories_dir, hh_path):
    """The reference pass is split over ranks and summed; only rank 0 generates and writes samples."""
    import json
    import os
    import subprocess
    import sys

    def raw(out, batch_size):
        return {"model": {"init": TINY, "tokenizer": str(stories_dir)},
                "data": {"train": str(hh_path), "max_length": 64, "max_samples": 10, "eval_fraction": 0.2},
                "orpo": {"objective": "dpo"},
                "train": {"output_dir": str(out), "max_steps": 2, "batch_size": batch_size, "eval_batch_size": 1,
                          "learning_rate": 1e-2, "eval_every": 2, "eval_generate": 2, "eval_generate_max_tokens": 4}}

    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    # its own cache: the two-process run must compute the reference itself, not read the one-process values
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ORPO_CACHE": str(tmp_path / "ddp-cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(raw(tmp_path / "ddp", 2))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "ddp-cache").glob("*/reference-*/logps.safetensors"))
    Trainer(load_config(raw=raw(tmp_path / "one", 4)), progress=False).setup().train()
    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one]
    for a, b in zip(ddp, one, strict=True):
        for key, value in b.items():
            if key not in ("tokens_per_s", "step"):
                assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
    assert ddp[0]["eval_dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    samples = [json.loads(x) for x in (tmp_path / "ddp" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 2, 2]  # written once, by rank 0
    assert samples == [json.loads(x) for x in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
