"""train.save_best (OUTPUT_DIR/best/) and the model card (README.md in final/ and best/).

The runs: a fresh tiny Llama on 90 quickstart pairs at a constant lr of 0.05, evaluated and
checkpointed at every step; its eval loss is lowest at step 4 and worse after, so the best model
is not the last one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import TINY as TINY_LLAMA
from transformers import AutoModelForCausalLM

from orpo.config import ConfigError, load_config
from orpo.train import Trainer, Watcher, list_checkpoints, read_metrics
from orpo.train.card import base_license, front_matter, hub_id, model_card
from orpo.train.checkpoint import read_weights

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"
TINY = {**TINY_LLAMA, "max_position_embeddings": 64}

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, model=None, **train):
    return load_config(raw={
        "model": model or {"init": TINY, "tokenizer": str(QS / "tokenizer")},
        "data": {"train": str(QS / "train.jsonl"), "max_length": 64, "max_samples": 120, "eval_fraction": 0.25},
        "train": {"output_dir": str(out), "batch_size": 8, "learning_rate": 0.05, "lr_scheduler": "constant",
                  "max_steps": 8, "eval_every": 1, "save_every": 1, "save_total_limit": None,
                  "save_best": "eval_loss", **train},
    })


class BestWrites(Watcher):
    """After each eval: the best record, the identity (inode) of best/'s weights file (i.e. which write it
    is), and a copy of the weights the model has at that step (the adapter's, for LoRA) as they are saved."""

    def __init__(self):
        self.seen: list[tuple[int, dict | None, int | None]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_eval(self, trainer, row):
        weights = next((trainer.output_dir / "best").glob("*.safetensors"), None)
        best = trainer.state.watchers.get("best")
        self.seen.append((row["step"], dict(best) if best else None, os.stat(weights).st_ino if weights else None))
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "peft_config"):
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(model)
        else:
            state = model.state_dict()
        self.weights[row["step"]] = {k: v.detach().clone() for k, v in state.items()}


class StopAfter(Watcher):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, row):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt  # as a kill would: no final/, the checkpoints stay


def _train(cfg, *watchers):
    trainer = Trainer(cfg, progress=False, watchers=list(watchers)).setup()
    return trainer, trainer.train()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _holds(saved: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor]) -> bool:
    """Every tensor of a checkpoint (``read_weights``: trainable ones, PEFT's runtime names) is in ``saved``."""
    names = {k.replace(".default.", "."): v for k, v in checkpoint.items()}
    return bool(names) and all(k in saved and torch.equal(saved[k], v) for k, v in names.items())


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    writes = BestWrites()
    trainer, result = _train(_cfg(tmp_path_factory.mktemp("best") / "run"), writes)
    evals = [r for r in read_metrics(trainer.output_dir) if "eval_loss" in r]
    return trainer, result, evals, writes.seen, writes.weights


def test_best_holds_the_weights_of_the_best_step(best_run):
    trainer, result, evals, _, weights = best_run
    losses = [r["eval_loss"] for r in evals]
    step = evals[losses.index(min(losses))]["step"]
    assert 0 < step < 8  # the test means something: the best is neither the start nor the end
    assert trainer.state.watchers["best"] == {"metric": "eval_loss", "value": min(losses), "step": step}
    best = trainer.output_dir / "best"
    assert _same(_tensors(best), weights[step])  # the live weights at that eval ...
    at_step = read_weights(trainer.output_dir / "checkpoints" / f"step-{step}")
    assert _holds(_tensors(best), at_step)  # ... and the checkpoint of that step
    assert not _same(_tensors(best), _tensors(trainer.output_dir / "final"))
    assert _same(_tensors(trainer.output_dir / "final"), weights[8])
    reloaded = AutoModelForCausalLM.from_pretrained(str(best))  # a standard HF folder, tokenizer included
    assert _same(reloaded.state_dict(), weights[step]) and _holds(reloaded.state_dict(), at_step)
    assert (best / "tokenizer.json").is_file() and (best / "chat_template.jinja").is_file()
    assert f"at step {step}" in (best / "README.md").read_text()
    assert any(n.startswith("best model") and f"at step {step}" in n for n in result.notes)
    assert not list(best.parent.glob(".best*"))  # no temporary folder left behind


def test_best_is_written_only_when_it_improves(best_run):
    _, _, evals, seen, _ = best_run
    running, improved = float("inf"), []
    for r in evals:
        if r["eval_loss"] < running:
            running = r["eval_loss"]
            improved.append(r["step"])
    assert [s for s, _, _ in seen] == [r["step"] for r in evals]
    assert [best["step"] for _, best, _ in seen] == [max(s for s in improved if s <= r["step"]) for r in evals]
    inodes = [ino for _, _, ino in seen]
    writes = sum(1 for i in range(len(inodes)) if i == 0 or inodes[i] != inodes[i - 1])
    assert writes == len(improved) and len(improved) < len(evals)


def test_a_maximized_metric_keeps_the_first_of_equal_values(tmp_path):
    writes = BestWrites()
    trainer, _ = _train(_cfg(tmp_path / "acc", save_best="eval_accuracy", save_every=None, max_steps=6), writes)
    acc = [(r["step"], r["eval_accuracy"]) for r in read_metrics(trainer.output_dir) if "eval_accuracy" in r]
    top = max(a for _, a in acc)
    first = next(s for s, a in acc if a == top)
    assert trainer.state.watchers["best"] == {"metric": "eval_accuracy", "value": top, "step": first}
    assert len(set(a for _, a in acc)) < len(acc)  # there are ties, and they did not rewrite best/
    rewrites = sum(1 for i, (_, _, ino) in enumerate(writes.seen) if i == 0 or ino != writes.seen[i - 1][2])
    running, better = -1.0, 0
    for _, a in acc:
        if a > running:
            running, better = a, better + 1
    assert rewrites == better


def test_best_survives_a_resume(best_run, tmp_path):
    ref, _, _, _, _ = best_run
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train(_cfg(out), StopAfter(6))
    record = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())["watchers"]["best"]
    assert record == ref.state.watchers["best"]  # the best so far is in the checkpoint's trainer state
    inode = os.stat(out / "best" / "model.safetensors").st_ino
    resumed, _ = _train(_cfg(out, resume="auto"))
    assert resumed.resume_from.name == "step-6"
    assert resumed.state.watchers["best"] == ref.state.watchers["best"]
    assert os.stat(out / "best" / "model.safetensors").st_ino == inode  # steps 7, 8 were worse: not rewritten
    assert _same(_tensors(out / "best"), _tensors(ref.output_dir / "best"))


def test_a_lora_best_is_an_adapter_that_loads(tmp_path):
    from orpo.train import load_for_inference

    model = {"init": TINY, "tokenizer": str(QS / "tokenizer"), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    writes = BestWrites()
    trainer, _ = _train(_cfg(tmp_path / "lora", model=model, max_steps=4, learning_rate=0.02), writes)
    step = trainer.state.watchers["best"]["step"]
    best = trainer.output_dir / "best"
    assert (best / "adapter_config.json").is_file() and not (best / "model.safetensors").exists()
    adapter = load_file(str(best / "adapter_model.safetensors"))
    assert _same(adapter, writes.weights[step])
    assert step > 0 and not _same(adapter, writes.weights[0])  # the adapter trained (B starts at zero)
    saved = read_weights(trainer.output_dir / "checkpoints" / f"step-{step}")
    assert _holds(adapter, saved) and len(adapter) == len(saved)
    # a fresh (model.init) base is saved with the adapter, and the adapter points at it
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (best / "base").resolve())
    loaded, _ = load_for_inference(str(best), device="cpu")
    assert loaded is not None


def test_save_best_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="eval_pairs' is not an eval metric with a known direction"):
        _cfg(tmp_path, save_best="eval_pairs")
    with pytest.raises(ConfigError, match="not an eval metric"):
        _cfg(tmp_path, save_best="loss")
    raw = _cfg(tmp_path).model_dump(mode="json")
    raw["data"]["eval_fraction"] = 0.0
    raw["train"]["eval_every"] = None
    with pytest.raises(ConfigError, match="train.save_best needs eval data"):
        load_config(raw=raw)
    trainer = Trainer(_cfg(tmp_path / "x", save_best="eval_general_ppl"), progress=False).setup()
    with pytest.raises(ConfigError, match=r"no eval metric 'eval_general_ppl' \(it has: eval_loss, eval_nll_loss"):
        trainer.train()
    assert trainer.state.step == 0  # refused at the step-0 eval, before any training


def test_overwrite_removes_an_old_best(best_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(best_run[0].output_dir, out)
    _train(_cfg(out, save_best=None, overwrite=True, max_steps=1, save_every=None))
    assert not (out / "best").exists() and (out / "final").is_dir() and not list_checkpoints(out)


# ---------------------------------------------------------------------------------------------
# The model card


def test_final_model_card_holds_metadata_numbers_and_config(best_run):
    trainer, _, evals, _, _ = best_run
    text = (trainer.output_dir / "final" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["tags"][:2] == ["orpo", "preference-optimization"] and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # model.init: no hub base
    last = evals[-1]
    table = dict(re.findall(r"^\| (\w+) \| ([-\d.]+) \|$", text, re.MULTILINE))
    assert last["step"] == 8 and "On the eval set at step 8:" in text
    for key in ("loss", "nll_loss", "or_loss", "accuracy", "log_odds_ratio", "logps_chosen", "logps_rejected"):
        assert float(table[key]) == pytest.approx(last[f"eval_{key}"], abs=5e-5), key
    assert table["pairs"] == str(last["eval_pairs"])
    codes = list(trainer.state.warnings)
    assert all(f"- `{c}`:" in text for c in codes) and ("None were raised." in text) == (not codes)
    assert "Preference data" in text  # the data summary
    config = yaml.safe_load(text.split("## Configuration")[1].split("```yaml\n")[1].split("```")[0])
    assert config == trainer.cfg.model_dump(mode="json")


def test_card_metadata_for_hub_names_adapters_and_a_local_license(tmp_path):
    cfg = load_config(raw={
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B", "lora": {}},
        "data": {"train": "argilla/ultrafeedback-binarized-preferences-cleaned", "eval": "org/held-out:test"},
        "train": {"output_dir": str(tmp_path / "qwen-orpo")},
    })
    row = {"step": 30, "eval_loss": 1.25, "eval_accuracy": 0.75}
    card = model_card(cfg, step=30, eval_row=row, summary=None, warnings={"instruct_start": "looks instruct"},
                      adapter=True)
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["library_name"] == "peft"
    assert meta["datasets"] == ["argilla/ultrafeedback-binarized-preferences-cleaned", "org/held-out"]
    assert "lora" in meta["tags"] and "| accuracy | 0.7500 |" in card and "- `instruct_start`: looks instruct" in card
    assert "with ORPO (odds ratio preference optimization, λ = 0.1)" in card
    cfg.orpo.objective = "dpo"
    assert "with the `dpo` objective" in model_card(cfg, step=30, eval_row=row, summary=None, warnings={}, adapter=True)
    assert hub_id("elsewhere/train.jsonl") is None and hub_id("../shared/data") is None  # files, not hub ids

    local = tmp_path / "my-base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# my base\n")
    assert base_license(str(local)) == "mit"
    cfg.model.name_or_path = str(local)
    meta = front_matter(model_card(cfg, step=1, eval_row=None, summary=None, warnings={}, adapter=False))
    assert meta["license"] == "mit" and "base_model" not in meta  # a local folder is no hub id


def test_card_includes_the_data_checks_when_the_summary_has_them(best_run):
    trainer, _, _, _, _ = best_run
    summary = trainer.data.summary
    summary.checks = {"duplicates": {"count": 2, "examples": [3, 9]}}
    card = model_card(trainer.cfg, step=8, eval_row=None, summary=summary, warnings={}, adapter=False)
    assert "Data checks" in card and "duplicates:" in card and "- 9" in card
