"""The LoRA adapter a run builds is the one its configuration describes (issue 6).

Every expectation here is worked out by hand from the architecture's numbers (hidden size, heads,
intermediate size), never from our own config or from PEFT, and read back from what was built:
the PEFT model, ``final/adapter_config.json`` and ``final/adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import math
import warnings
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orpo.cli import main
from orpo.config import ConfigError, LoraConfig, ModelConfig, load_config
from orpo.train import Trainer, load_model, load_tokenizer
from orpo.train.model import (
    LoraMismatchError,
    adapted_layers,
    check_lora,
    describe_lora,
    lora_target_names,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SOME = ["q_proj", "v_proj", "down_proj"]

# stories260K (its config.json): hidden 64, 8 heads of 8, 4 kv heads, intermediate 172, 5 layers
STORIES = {"hidden": 64, "heads": 8, "kv_heads": 4, "head_dim": 8, "intermediate": 172, "layers": 5}
# the tiny Qwen2 built from model.init below
QWEN_INIT = {"arch": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 64}
QWEN = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "intermediate": 64, "layers": 2}


def shapes(a: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a Llama/Qwen2 decoder layer."""
    h, q, kv, i = a["hidden"], a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"], a["intermediate"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_params(a: dict, kinds: list[str], r: int, layers: int | None = None, dora: bool = False) -> int:
    """A (r x in) + B (out x r) per adapted layer, plus DoRA's magnitude (out) when on."""
    per_layer = sum(r * (i + o) + (o if dora else 0) for k, (i, o) in shapes(a).items() if k in kinds)
    return per_layer * (a["layers"] if layers is None else layers)


def _names(kinds: list[str], a: dict) -> set[str]:
    """Full module names of ``kinds`` in every decoder layer."""
    return {f"model.layers.{i}.{'mlp' if k in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{k}"
            for i in range(a["layers"]) for k in kinds}


def _selected(entries: list[str], a: dict) -> set[str]:
    """The linear layers (decoder layers' and the LM head) a saved ``target_modules`` list selects, as PEFT reads it."""
    universe = _names(ALL_LINEAR, a) | {"lm_head"}
    hits = {e: {n for n in universe if n == e or n.endswith(f".{e}")} for e in entries}
    assert all(hits.values()), f"entries that select nothing: {[e for e, h in hits.items() if not h]}"
    return set().union(*hits.values())


def _model(kind: str, stories_dir: Path) -> dict:
    return {"name_or_path": str(stories_dir)} if kind == "stories" else {"init": QWEN_INIT, "tokenizer": str(stories_dir)}


def _cfg(out: Path, model: dict, hh_path: Path, lora: dict, **train):
    return load_config(raw={
        "model": {**model, "chat_template": "chatml", "lora": lora},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 6},
        "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 2, "learning_rate": 1e-2, **train},
    })


def _run(cfg) -> Trainer:
    trainer = Trainer(cfg, progress=False, console=Console(file=StringIO())).setup()
    trainer.train()
    return trainer


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


# ---------------------------------------------------------------------------------------------
# What a run builds and saves


@pytest.mark.parametrize("target", ["all-linear", SOME], ids=["all-linear", "list"])
@pytest.mark.parametrize("kind", ["stories", "qwen2"])
def test_final_adapter_holds_the_configured_modules_dropout_and_parameter_count(
        kind, target, tmp_path, stories_dir, hh_path):
    arch = STORIES if kind == "stories" else QWEN
    out = tmp_path / "run"
    console = StringIO()
    cfg = _cfg(out, _model(kind, stories_dir), hh_path, {"r": 4, "alpha": 8, "dropout": 0.15, "target_modules": target})
    trainer = Trainer(cfg, progress=False, console=Console(file=console, width=200)).setup()
    trainer.train()
    kinds = ALL_LINEAR if target == "all-linear" else SOME
    expected = lora_params(arch, kinds, r=4)

    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    # PEFT writes an 'all-linear' it resolved either as the names' last parts or, for a few modules, in full
    assert _selected(saved["target_modules"], arch) == _names(kinds, arch)
    assert saved["lora_dropout"] == 0.15 and saved["r"] == 4 and saved["lora_alpha"] == 8
    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in weights.values()) == expected
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    layers = adapted_layers(model)
    assert len(layers) == len(kinds) * arch["layers"]
    assert {m.lora_dropout["default"].p for m in layers.values()} == {0.15}

    short = " ".join(k.removesuffix("_proj") for k in kinds)
    line = f"LoRA r=4 on {len(kinds)} module kinds × {arch['layers']} layers ({short}): {expected:,} trainable"
    assert line in console.getvalue()


def test_lora_dropout_is_drawn_in_training_and_off_in_eval(stories_dir, stories_tokenizer):
    model = load_model(ModelConfig(name_or_path=str(stories_dir), lora={"r": 4, "dropout": 0.5,
                                                                         "init_lora_weights": False}),
                       stories_tokenizer)
    ids = torch.tensor([[1, 200, 300, 400, 42]])
    with torch.no_grad():
        model.train()
        a, b = model(ids).logits, model(ids).logits
    assert not torch.equal(a, b)  # two dropout draws
    torch.testing.assert_close(_logits(model, ids), _logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_rslora": True}, {"init_lora_weights": "pissa"},
                                     {"init_lora_weights": "olora"}], ids=["dora", "rslora", "pissa", "olora"])
def test_variant_survives_save_reload_and_merge(options, tmp_path, stories_dir, hh_path, capsys):
    out = tmp_path / "run"
    trainer = _run(_cfg(out, _model("stories", stories_dir), hh_path, {"r": 4, "alpha": 8, **options}, max_steps=2))
    final = out / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(final))
    layer = adapted_layers(adapter)["model.layers.0.self_attn.q_proj"]
    weights = load_file(str(final / "adapter_model.safetensors"))
    if options.get("use_dora"):
        assert saved["use_dora"] is True
        magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
        assert len(magnitudes) == 7 * 5
        assert sum(weights[k].numel() for k in weights) == lora_params(STORIES, ALL_LINEAR, r=4, dora=True)
    if options.get("use_rslora"):
        assert saved["use_rslora"] is True
        # rsLoRA scales by alpha / sqrt(r), not alpha / r
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    else:
        assert layer.scaling["default"] == pytest.approx(8 / 4)
    if "init_lora_weights" in options:
        assert saved["init_lora_weights"] == options["init_lora_weights"]
        base = AutoModelForCausalLM.from_pretrained(str(stories_dir))
        inner = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
        # PiSSA / OLoRA take the adapter's start out of the base weights
        assert not torch.equal(inner.model.layers[0].self_attn.q_proj.base_layer.weight,
                               base.model.layers[0].self_attn.q_proj.weight)

    assert main(["merge", str(final), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = torch.tensor([[1, 200, 300, 400, 42, 7, 99]])
    expected = _logits(trainer.accelerator.unwrap_model(trainer.model), ids)
    torch.testing.assert_close(_logits(adapter, ids), expected, rtol=1e-5, atol=1e-5)
    # merged W + BA (and DoRA's folded magnitude) rounds differently from the adapter's separate terms
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), rtol=1e-4, atol=1e-4)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(str(stories_dir)), ids)
    assert (base_logits - expected).abs().max() > 1e-3  # the adapter learned something


# ---------------------------------------------------------------------------------------------
# Each key's effect on the built model


@pytest.fixture(scope="module")
def qwen_tokenizer(stories_dir):
    return load_tokenizer(ModelConfig(init=QWEN_INIT, tokenizer=str(stories_dir)))


def _qwen(stories_dir, tokenizer, **lora):
    return load_model(ModelConfig(init=QWEN_INIT, tokenizer=str(stories_dir), lora={"r": 2, **lora}), tokenizer)


def _trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_layers_to_transform_with_all_linear_and_a_list(stories_dir, stories_tokenizer):
    model = load_model(ModelConfig(name_or_path=str(stories_dir), lora={"r": 2, "layers_to_transform": [1, 3]}),
                       stories_tokenizer)
    assert sorted({int(n.split(".")[2]) for n in adapted_layers(model)}) == [1, 3]
    assert sum(_trainable(model).values()) == lora_params(STORIES, ALL_LINEAR, r=2, layers=2)
    assert "7 module kinds × 2 layers" in describe_lora(model)
    model = load_model(ModelConfig(name_or_path=str(stories_dir),
                                   lora={"r": 2, "target_modules": ["o_proj"], "layers_to_transform": [4]}),
                       stories_tokenizer)
    assert list(adapted_layers(model)) == ["model.layers.4.self_attn.o_proj"]


def test_target_modules_regex(stories_dir, stories_tokenizer):
    lora = {"r": 2, "target_modules": r"model\.layers\.[02]\.mlp\.(up|down)_proj"}
    model = load_model(ModelConfig(name_or_path=str(stories_dir), lora=lora), stories_tokenizer)
    assert sorted(adapted_layers(model)) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj",
                                             "model.layers.2.mlp.down_proj", "model.layers.2.mlp.up_proj"]
    assert sum(_trainable(model).values()) == lora_params(STORIES, ["up_proj", "down_proj"], r=2, layers=2)


def test_modules_to_save_trains_and_saves_the_module_in_full(stories_dir, stories_tokenizer, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(stories_dir), lora={"r": 2, "modules_to_save": ["lm_head"]}),
                       stories_tokenizer)
    lm_head = 512 * 64  # vocab x hidden, untied in stories260K
    trainable = _trainable(model)
    assert sum(trainable.values()) == lora_params(STORIES, ALL_LINEAR, r=2) + lm_head
    assert "model.lm_head" not in "".join(adapted_layers(model))  # trained in full, not adapted
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert [k for k in saved if "lm_head" in k] == ["base_model.model.lm_head.weight"]
    assert "+ lm_head in full" in describe_lora(model)


@pytest.mark.parametrize(("bias", "extra"), [("none", 0), ("all", 2 * (32 + 16 + 16)), ("lora_only", 2 * 32)])
def test_bias(bias, extra, stories_dir, qwen_tokenizer):
    """Qwen2 has biases on q (32), k and v (2 heads x 8 = 16 each); lora_only: those of adapted layers (q)."""
    model = _qwen(stories_dir, qwen_tokenizer, bias=bias, target_modules=["q_proj", "o_proj"])
    trainable = _trainable(model)
    assert sum(trainable.values()) == lora_params(QWEN, ["q_proj", "o_proj"], r=2) + extra
    assert sum(v for n, v in trainable.items() if n.endswith("bias")) == extra


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "olora"])
def test_init_lora_weights(init, stories_dir, stories_tokenizer):
    model = load_model(ModelConfig(name_or_path=str(stories_dir), lora={"r": 4, "init_lora_weights": init}),
                       stories_tokenizer)
    layer = adapted_layers(model)["model.layers.1.mlp.up_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    w0 = base.model.layers[1].mlp.up_proj.weight
    if init is True:
        assert not b.any() and a.abs().max() <= 1 / math.sqrt(64)  # B = 0, A Kaiming-uniform(a=sqrt 5)
    elif init == "gaussian":
        assert not b.any() and a.std().item() == pytest.approx(1 / 4, rel=0.2)  # A ~ N(0, 1/r)
    elif init is False:
        assert b.any()
    else:
        # the base weight now holds W - scale * B A, so the adapted layer still computes W
        assert b.any() and not torch.equal(layer.base_layer.weight, w0)
        torch.testing.assert_close(layer.base_layer.weight + layer.scaling["default"] * b @ a, w0,
                                   rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[1, 200, 300, 400, 42]])
    same = torch.allclose(_logits(model, ids), _logits(base, ids), atol=1e-4)
    assert same == (init is not False)  # every init but `false` starts as the base model


def test_pissa_with_a_fresh_init_model_is_refused(stories_dir, qwen_tokenizer):
    with pytest.raises(ConfigError, match="init_lora_weights=pissa.*name_or_path"):
        _qwen(stories_dir, qwen_tokenizer, init_lora_weights="pissa")


# ---------------------------------------------------------------------------------------------
# The check after every build


def _stories_peft(stories_dir, **peft_kwargs):
    base = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return base, get_peft_model(base, PeftLoraConfig(task_type="CAUSAL_LM", **peft_kwargs))


def test_check_catches_the_adapter_of_issue_6(stories_dir):
    """The bug: PEFT got r and alpha only, so it built its Llama default (q_proj, v_proj, no dropout)."""
    lora = LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    plain = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    expected = lora_target_names(plain, lora)
    assert len(expected) == 7 * 5
    _, built = _stories_peft(stories_dir, r=16, lora_alpha=32)
    with pytest.raises(LoraMismatchError) as e:
        check_lora(built, lora, expected)
    msg = str(e.value)
    assert "configured 7 module kinds × 5 layers (q k v o gate up down)" in msg
    assert "built 2 module kinds × 5 layers (q v)" in msg
    assert "dropout configured 0.05, built 0.0" in msg
    assert "\n" not in msg


def test_check_compares_rank_scale_and_dora(stories_dir):
    _, built = _stories_peft(stories_dir, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"])
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(5)]
    check_lora(built, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"]), names)  # the same: fine
    for wrong, message in [({"r": 8}, "r configured 8, built 4"), ({"alpha": 16}, "scale configured 4.0, built 2.0"),
                           ({"use_rslora": True}, "scale configured 4.0, built 2.0"),
                           ({"use_dora": True}, "use_dora configured True, built False")]:
        lora = LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"], **wrong})
        with pytest.raises(LoraMismatchError, match=message):
            check_lora(built, lora, names)


@pytest.mark.parametrize(("lora", "message"), [
    ({"target_modules": ["q_proj", "qproj"]}, "target_modules entry 'qproj' matches no module"),
    ({"layers_to_transform": [0, 5]}, r"no layer 5 was adapted \(adapted layers: \[0\]\)"),
    ({"modules_to_save": ["lm_haed"]}, "modules_to_save entry 'lm_haed' matches no module"),
    ({"bias": "all"}, "bias='all' but no bias of this model trains"),
])
def test_entries_that_select_nothing_are_errors(lora, message, stories_dir, stories_tokenizer):
    """PEFT skips each of these silently."""
    with pytest.raises(LoraMismatchError, match=message):
        load_model(ModelConfig(name_or_path=str(stories_dir), lora=lora), stories_tokenizer)


@pytest.mark.parametrize(("lora", "message"), [
    ({"target_modules": ["nothing_here"]}, "PEFT rejects it: Target modules {'nothing_here'} not found"),
    ({"target_modules": ["mlp"]}, "model.layers.0.mlp is a LlamaMLP, a block of layers.*gate_proj, up_proj"),
])
def test_what_peft_rejects_is_a_one_line_config_error(lora, message, stories_dir, stories_tokenizer):
    with pytest.raises(ConfigError, match=message) as e:
        load_model(ModelConfig(name_or_path=str(stories_dir), lora=lora), stories_tokenizer)
    assert "\n" not in str(e.value)


def test_a_rejected_lora_key_exits_2_without_a_traceback(tmp_path, stories_dir, hh_path, capsys):
    raw = {"model": {"name_or_path": str(stories_dir), "chat_template": "chatml",
                     "lora": {"target_modules": ["nothing_here"]}},
           "data": {"train": str(hh_path), "max_length": 64, "max_samples": 4},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "orpo train: error: model.lora: PEFT rejects it: Target modules {'nothing_here'} not found" in err
    assert "Traceback" not in err
    assert main(["train", str(tmp_path / "cfg.yaml"), "model.lora.target_modules=.*q_proj",
                 "model.lora.layers_to_transform=[0]"]) == 2
    assert "layers_to_transform works with target_modules 'all-linear' or a list" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing with LoRA


def test_gradient_checkpointing_with_lora_gives_the_same_gradients_and_no_warnings(
        tmp_path, stories_dir, hh_path, capfd):
    grads = {}
    for gc in (True, False):
        cfg = _cfg(tmp_path / str(gc), _model("stories", stories_dir), hh_path, {"r": 4, "dropout": 0.0})
        cfg.model.gradient_checkpointing = gc
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(cfg, progress=False, console=Console(file=StringIO())).setup()
            batch = next(trainer._micro_batches())[0]
            trainer._forward_backward([batch])
        printed = capfd.readouterr().err
        assert [str(w.message) for w in caught] == []
        assert "warn" not in printed.lower(), printed
        model = trainer.accelerator.unwrap_model(trainer.model)
        assert model.get_base_model().is_activation_checkpointing is gc
        grads[gc] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads[True]) == 2 * 7 * 5 and all(g is not None for g in grads[True].values())
    assert all(g.any() for n, g in grads[True].items() if "lora_B" in n)  # (A's is 0 while B starts at 0)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)
