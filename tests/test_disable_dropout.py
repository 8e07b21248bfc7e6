"""``train.disable_dropout``: every dropout of the model set up for a run is 0 when on (the default
for objectives with a reference, DPO), and untouched when off (the default for ORPO)."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY

from orpo.config import load_config
from orpo.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path, stories_dir, hh_path, objective: str = "orpo", **train) -> Trainer:
    raw = {"model": {"init": {**TINY, "attention_dropout": 0.1}, "tokenizer": str(stories_dir),
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.05}},
           "orpo": {"objective": objective},
           "data": {"train": str(hh_path), "max_length": 64, "max_samples": 6},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, **train}}
    return Trainer(load_config(raw=raw), progress=False).setup()


def _rates(trainer: Trainer) -> dict[str, float]:
    """Every dropout rate the model will apply: nn.Dropout modules, attention modules' rates, the config's."""
    model = trainer.engine.unwrap(trainer.model)
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    rates |= {f"{name}.attention_dropout": m.attention_dropout for name, m in model.named_modules()
              if isinstance(getattr(m, "attention_dropout", None), float)}
    rates["config.attention_dropout"] = model.config.attention_dropout
    return rates


def test_on_sets_every_dropout_to_zero(tmp_path, stories_dir, hh_path):
    rates = _rates(_setup(tmp_path, stories_dir, hh_path, disable_dropout=True))
    assert any("lora_dropout" in k for k in rates) and any(k.endswith("self_attn.attention_dropout") for k in rates)
    assert set(rates.values()) == {0.0}, rates


def test_off_by_default_without_a_reference(tmp_path, stories_dir, hh_path):
    rates = _rates(_setup(tmp_path, stories_dir, hh_path))
    lora = {v for k, v in rates.items() if "lora_dropout" in k}
    attention = {v for k, v in rates.items() if "attention_dropout" in k}
    assert lora == {0.05} and attention == {0.1}, rates


def test_on_by_default_for_dpo(tmp_path, stories_dir, hh_path):
    rates = _rates(_setup(tmp_path, stories_dir, hh_path, objective="dpo"))
    assert set(rates.values()) == {0.0}, rates


def test_dpo_can_keep_its_dropout(tmp_path, stories_dir, hh_path):
    rates = _rates(_setup(tmp_path, stories_dir, hh_path, objective="dpo", disable_dropout=False))
    assert {v for k, v in rates.items() if "lora_dropout" in k} == {0.05}, rates
