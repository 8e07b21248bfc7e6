"""The trainable-parameter counts the LoRA example configs claim, computed from the real architectures.

Config only, no weights: the model is built on the meta device (shapes without storage) and
wrapped by ``apply_lora``, the code a run uses, with the example's own ``model.lora`` section.
QLoRA's 4-bit base changes no adapter shape, so its count is the LoRA one.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from orpo.config import LoraConfig, load_config
from orpo.train.model import apply_lora, describe_lora

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LORA_EXAMPLES = [p for p in sorted(EXAMPLES.glob("*.yaml")) if load_config(p).model.lora is not None]

# The published config.json of each base model a LoRA example names (dimensions only).
ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
}
CLAIM = re.compile(r"([\d,]+) trainable parameters")


def test_the_llama3_examples_are_covered():
    assert {"llama3-8b-lora.yaml", "llama3-8b-qlora.yaml"} <= {p.name for p in LORA_EXAMPLES}


@pytest.mark.parametrize("path", LORA_EXAMPLES, ids=lambda p: p.name)
def test_claimed_trainable_parameters_are_what_the_adapter_has(path: Path):
    cfg = load_config(path)
    assert cfg.model.lora is not None and cfg.model.name_or_path in ARCHITECTURES, path.name
    claims = CLAIM.findall(path.read_text())
    assert len(claims) == 1, f"{path.name}: say the adapter's size once, as 'N trainable parameters'"
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(ARCHITECTURES[cfg.model.name_or_path])
        model = apply_lora(model, cfg.model.lora)
    trainable = _trainable(model)
    assert f"{trainable:,}" == claims[0], f"{path.name} claims {claims[0]}; the adapter has {trainable:,}"
    assert describe_lora(model).endswith(f": {trainable:,} trainable")


def test_llama3_8b_before_and_after_issue_6():
    """By hand, r=16 on 32 layers: A (16 x in) + B (out x 16) per linear layer. Before the fix PEFT
    got no target_modules and used its Llama default, q_proj and v_proj; now 'all-linear' arrives."""
    h, kv, inter, r = 4096, 8 * 128, 14336, 16
    per_layer = {"q": r * (h + h), "k": r * (h + kv), "v": r * (h + kv), "o": r * (h + h),
                 "gate": r * (h + inter), "up": r * (h + inter), "down": r * (inter + h)}
    arch = ARCHITECTURES["meta-llama/Meta-Llama-3-8B-Instruct"]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT asks transformers a deprecated question
        before = get_peft_model(AutoModelForCausalLM.from_config(arch),
                                PeftLoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"))
        after = apply_lora(AutoModelForCausalLM.from_config(arch),
                           LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
    assert _trainable(before) == 32 * (per_layer["q"] + per_layer["v"]) == 6_815_744
    assert _trainable(after) == 32 * sum(per_layer.values()) == 41_943_040


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
