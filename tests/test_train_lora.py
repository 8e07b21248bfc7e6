"""LoRA runs on the real stories260K model: adapter output, merge, resume of an adapter checkpoint.

What the adapter holds (modules, dropout, PEFT's options) is tested in test_lora_adapter.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from tiny import TINY
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo.config import load_config
from orpo.train import Trainer, load_for_inference, merge_lora, read_metrics
from orpo.train.model import adapted_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, model, hh_path, **train):
    return load_config(raw={
        "model": {**model, "chat_template": "chatml", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 8},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "save_every": 2,
                  **train},
    })


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, stories_dir, hh_path):
    out = tmp_path_factory.mktemp("lora") / "run"
    trainer = Trainer(_cfg(out, {"name_or_path": str(stories_dir)}, hh_path), progress=False).setup()
    trainer.train()
    return trainer


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_lora_final_is_an_adapter_with_the_chat_template(lora_run, stories_dir):
    final = lora_run.output_dir / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(stories_dir)
    tok = AutoTokenizer.from_pretrained(str(final))
    assert tok.chat_template == lora_run.data.template.jinja and "<|im_start|>" in tok.chat_template
    # only the adapter trained: the base weights are the pretrained ones
    base = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    inner = lora_run.accelerator.unwrap_model(lora_run.model).get_base_model()
    torch.testing.assert_close(inner.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)


def test_merge_gives_the_logits_of_the_adapter_model(lora_run, stories_dir, tmp_path):
    final = lora_run.output_dir / "final"
    merged_dir = merge_lora(final, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 200, 300, 400, 42, 7, 99]])
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(final))
    loaded, tok = load_for_inference(str(final))  # what `orpo eval` / `orpo generate` load
    assert tok.chat_template == lora_run.data.template.jinja
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    trained = lora_run.accelerator.unwrap_model(lora_run.model)
    expected = _logits(trained, ids)
    torch.testing.assert_close(_logits(adapter, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    # merged W + BA rounds differently from W x + B A x
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    assert (_logits(base, ids) - expected).abs().max() > 1e-3  # the adapter learned something


def test_lora_resume_from_a_checkpoint_path_matches(lora_run, stories_dir, hh_path, tmp_path):
    step2 = lora_run.output_dir / "checkpoints" / "step-2"
    resumed = Trainer(_cfg(tmp_path / "resumed", {"name_or_path": str(stories_dir)}, hh_path, resume=str(step2)),
                      progress=False).setup()
    resumed.train()

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if r["step"] > 2]

    assert strip(read_metrics(tmp_path / "resumed")) == strip(read_metrics(lora_run.output_dir))
    assert len(strip(read_metrics(tmp_path / "resumed"))) == 2


class Interrupt(Exception):
    pass


def test_lora_dropout_run_killed_and_resumed_matches_the_uninterrupted_run(lora_run, stories_dir, hh_path, tmp_path):
    """Dropout 0.1 on every adapter input: its draws come from the checkpointed RNG, so the resumed
    steps draw the same masks as the uninterrupted run and the metrics and weights match exactly."""
    model = lora_run.accelerator.unwrap_model(lora_run.model)
    assert {m.lora_dropout["default"].p for m in adapted_layers(model).values()} == {0.1}

    def stop_after_3(trainer):
        if trainer.state.step == 3:
            raise Interrupt

    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        Trainer(_cfg(out, {"name_or_path": str(stories_dir)}, hh_path), progress=False,
                on_step_end=stop_after_3).setup().train()
    assert not (out / "final").exists()
    resumed = Trainer(_cfg(out, {"name_or_path": str(stories_dir)}, hh_path, resume="auto"), progress=False).setup()
    resumed.train()
    assert resumed.resume_from.name == "step-2"

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert strip(read_metrics(out)) == strip(read_metrics(lora_run.output_dir))
    a = load_file(str(out / "final" / "adapter_model.safetensors"))
    b = load_file(str(lora_run.output_dir / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_fresh_init_model_saves_its_base_and_merges(stories_dir, hh_path, tmp_path):
    cfg = _cfg(tmp_path / "run", {"init": TINY, "tokenizer": str(stories_dir)}, hh_path, max_steps=1,
               save_every=None)
    trainer = Trainer(cfg, progress=False).setup()
    trainer.train()
    final = tmp_path / "run" / "final"
    assert (final / "base" / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(merge_lora(final, tmp_path / "merged")))
    ids = torch.tensor([[1, 5, 9, 200]])
    expected = _logits(trainer.accelerator.unwrap_model(trainer.model), ids)
    # merged W + BA rounds differently from W x + B A x
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
