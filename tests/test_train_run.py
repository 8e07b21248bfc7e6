"""Whole runs on real data (HH pairs, the stories260K tokenizer): determinism, kill + resume,
checkpoint rotation and refusals, evaluation rows, the NaN guard, the final model."""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest
import torch
from tiny import TINY as TINY_LLAMA
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo.config import ConfigError, load_config
from orpo.train import (
    ResumeError,
    Trainer,
    TrainingDiverged,
    evaluate,
    list_checkpoints,
    load_for_inference,
    read_metrics,
)

# dropout draws from the RNG: a resume must restore it
TINY = {**TINY_LLAMA, "attention_dropout": 0.1}



pytestmark = pytest.mark.usefixtures("one_thread")

def _cfg(out, stories_dir, hh_path, data=None, **train):
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12, "eval_fraction": 0.25, **(data or {})},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 2, "grad_accum": 2, "learning_rate": 1e-3,
                  "save_every": 2, "save_total_limit": 2, "eval_every": 3, **train},
    })


def _run(cfg, **kwargs) -> Trainer:
    trainer = Trainer(cfg, progress=False, **kwargs).setup()
    trainer.train()
    return trainer


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


class Interrupt(Exception):
    pass


def _stop_after(step):
    def hook(trainer):
        if trainer.state.step == step:
            raise Interrupt

    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stories_dir, hh_path):
    """One uninterrupted 6-step run (9 train pairs: micro-batches 2,2,2,2,1 per epoch, so steps cross epochs)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    trainer = _run(_cfg(out, stories_dir, hh_path, report_to=["tensorboard"]))
    return trainer, read_metrics(out)


def test_metrics_rows_have_the_promised_keys_and_eval_rows(reference):
    trainer, rows = reference
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [0, 3, 6]  # before training, every 3 steps, at the end
    keys = {"step", "epoch", "loss", "nll_loss", "or_loss", "log_odds_ratio", "logps_chosen", "logps_rejected",
            "accuracy", "margin", "lr", "grad_norm", "tokens_per_s"}
    for r in train_rows:
        assert keys <= set(r) and all(math.isfinite(r[k]) for k in keys - {"step"})
        assert r["loss"] == pytest.approx(r["nll_loss"] + 0.1 * r["or_loss"])
    for r in eval_rows:
        assert r["eval_pairs"] == 3 and 0 <= r["eval_accuracy"] <= 1
        assert all(math.isfinite(r[k]) for k in ("eval_loss", "eval_nll_loss", "eval_log_odds_ratio"))
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]  # lr 1e-3 on a fresh model: it learns
    assert train_rows[-1]["epoch"] == pytest.approx(12 / 5)  # 12 micro-batches of 5 per epoch
    assert any((trainer.output_dir / "tensorboard").iterdir())


def test_same_config_twice_gives_identical_metrics(reference, tmp_path, stories_dir, hh_path):
    _, rows = reference
    _run(_cfg(tmp_path / "again", stories_dir, hh_path))
    assert _without_timing(read_metrics(tmp_path / "again")) == _without_timing(rows)


def test_resume_after_interruption_matches_the_uninterrupted_run(reference, tmp_path, stories_dir, hh_path):
    _, rows = reference
    out = tmp_path / "run"
    with pytest.raises(Interrupt):  # stopped after step 5 (logged), the last checkpoint is step 4
        _run(_cfg(out, stories_dir, hh_path), on_step_end=_stop_after(5))
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-4"]
    assert max(r["step"] for r in read_metrics(out)) == 5
    (out / "checkpoints" / "step-6" / "state").mkdir(parents=True)  # as if killed while writing step 6

    resumed = _run(_cfg(out, stories_dir, hh_path, resume="auto"))
    assert resumed.resume_from.name == "step-4"
    # Steps 5 and 6 are recomputed, the killed run's step-5 row replaced: the file reads as one run.
    assert _without_timing(read_metrics(out)) == _without_timing(rows)
    assert (out / "checkpoints" / "step-6" / "manifest.json").is_file()  # the new step 6 replaced the leftover


def test_rotation_keeps_the_newest_complete_checkpoints(reference):
    trainer, _ = reference
    ckpts = list_checkpoints(trainer.output_dir)
    assert [p.name for p in ckpts] == ["step-4", "step-6"]  # save_every 2, save_total_limit 2
    names = {p.name for p in ckpts[-1].iterdir()}
    assert names == {"state", "scheduler.pt", "rng_state_0.pt", "trainer_state.json", "config.yaml", "manifest.json"}


def test_resume_refusals(reference, tmp_path, stories_dir, hh_path):
    trainer, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(trainer.output_dir, out)
    with pytest.raises(ResumeError, match="already holds a run.*resume=auto"):
        Trainer(_cfg(out, stories_dir, hh_path), progress=False).setup()
    with pytest.raises(ResumeError, match="data fingerprint"):
        Trainer(_cfg(out, stories_dir, hh_path, data={"max_samples": 11}, resume="auto"), progress=False).setup()
    with pytest.raises(ResumeError, match="train.batch_size: checkpoint 2, now 3"):
        Trainer(_cfg(out, stories_dir, hh_path, resume="auto", batch_size=3), progress=False).setup()
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        Trainer(_cfg(out, stories_dir, hh_path, resume=str(out / "checkpoints" / "step-5")), progress=False).setup()
    Trainer(_cfg(out, stories_dir, hh_path, overwrite=True), progress=False).setup()
    assert list_checkpoints(out) == [] and not (out / "final").exists()


def test_resuming_a_finished_run_says_so_and_changes_nothing(reference, tmp_path, stories_dir, hh_path):
    """``resume: auto`` on a finished run with no steps left stops (exit 2), before touching the folder."""
    trainer, rows = reference
    out = tmp_path / "copy"
    shutil.copytree(trainer.output_dir, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ResumeError, match="holds a finished run .final/ written at step 6. with nothing left to train"):
        Trainer(_cfg(out, stories_dir, hh_path, resume="auto"), progress=False).setup()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert read_metrics(out) == rows


def test_final_model_reloads_with_the_same_logits(reference):
    trainer, _ = reference
    final = trainer.output_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    assert tok.pad_token == "<unk>"
    ids = torch.tensor([tok("Once upon a time there was a cat").input_ids])
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_evaluating_the_final_folder_reproduces_the_last_eval_row(reference):
    trainer, rows = reference
    model, tokenizer = load_for_inference(str(trainer.output_dir / "final"))
    m = evaluate(model, trainer.data.eval, tokenizer.pad_token_id, batch_size=2)  # as `orpo eval`
    last = [r for r in rows if "eval_loss" in r][-1]
    for key in ("loss", "nll_loss", "or_loss", "accuracy", "logps_chosen", "logps_rejected", "log_odds_ratio"):
        assert m[key] == pytest.approx(last[f"eval_{key}"], rel=1e-5, abs=1e-6), key


def test_nan_steps_are_skipped_and_too_many_stop_the_run(tmp_path, stories_dir, hh_path):
    cfg = _cfg(tmp_path / "nan", stories_dir, hh_path, data={"eval_fraction": 0.0}, eval_every=None,
               max_bad_steps=3, save_every=2)
    trainer = Trainer(cfg, progress=False, on_step_end=lambda t: weights.append(_weights(t))).setup()
    weights = [_weights(trainer)]
    poisoned = {2, 3, 5, 6}  # steps whose forward returns NaN logits
    _poison_logits(trainer, poisoned)
    trainer.train()
    rows = read_metrics(tmp_path / "nan")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 3, 4]
    assert [r["loss"] is None for r in rows] == [False, True, True, False, True, True]
    assert torch.equal(weights[1], weights[3]) and not torch.equal(weights[3], weights[4])
    assert rows[2]["lr"] < rows[1]["lr"]  # the schedule follows the step number through skipped steps

    stop = _cfg(tmp_path / "stop", stories_dir, hh_path, data={"eval_fraction": 0.0}, eval_every=None,
                max_bad_steps=2, save_every=2)
    trainer = Trainer(stop, progress=False).setup()
    _poison_logits(trainer, {3, 4, 5, 6})
    with pytest.raises(TrainingDiverged, match=r"steps 3 to 4 \(2 in a row.*checkpoints/step-2"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "stop")] == ["step-2"]
    assert not (tmp_path / "stop" / "final").exists()


def test_bf16_autocast_run_is_finite(tmp_path, stories_dir, hh_path):
    cfg = _cfg(tmp_path / "bf16", stories_dir, hh_path, mixed_precision="bf16", max_steps=2, save_every=None,
               eval_every=None)
    result = _run(cfg)
    assert result.accelerator.mixed_precision == "bf16"
    rows = [r for r in read_metrics(tmp_path / "bf16") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_asked_but_missing_is_a_clear_error(tmp_path, stories_dir, hh_path):
    with pytest.raises(ConfigError, match="wandb is not installed"):
        Trainer(_cfg(tmp_path / "w", stories_dir, hh_path, report_to=["wandb"]), progress=False).setup()


def _weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])


def _poison_logits(trainer, steps: set[int]) -> None:
    """NaN logits on ``steps``, from the final hidden states: what every log-prob path (full or chunked) reads."""
    def hook(module, args, output):
        return output * float("nan") if trainer.state.step + 1 in steps else output

    trainer.accelerator.unwrap_model(trainer.model).model.norm.register_forward_hook(hook)
