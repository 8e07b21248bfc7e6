"""Model loading escape hatches (issue 19): model.init_kwargs, model.quantization,
model.gradient_checkpointing_kwargs, and --trust-remote-code / --dtype / --revision on eval, generate
and merge. Each is read back from what was built: the loaded model, the BitsAndBytesConfig passed,
the layers' checkpoint function, the merged files, the metrics a command prints."""

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
from transformers import AutoModelForCausalLM

from orpo.cli import main
from orpo.config import ConfigError, ModelConfig, load_config
from orpo.train.model import load_model, pretrained_kwargs

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "quickstart" / "train.jsonl"
LORA = {"r": 2, "target_modules": ["q_proj", "v_proj"]}


def model_cfg(stories_dir, **keys) -> ModelConfig:
    return ModelConfig(name_or_path=str(stories_dir), **keys)


# ---------------------------------------------------------------------------------------------
# model.init_kwargs


def test_init_kwargs_reach_from_pretrained(stories_dir, stories_tokenizer):
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}
    model = load_model(model_cfg(stories_dir, init_kwargs={"rope_parameters": rope}), stories_tokenizer)
    assert model.model.rotary_emb.rope_type == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    plain = load_model(model_cfg(stories_dir), stories_tokenizer)
    assert plain.model.rotary_emb.rope_type == "default"


@pytest.mark.parametrize("key, instead", [
    ("torch_dtype", "model.dtype"), ("dtype", "model.dtype"), ("revision", "model.revision"),
    ("trust_remote_code", "model.trust_remote_code"), ("quantization_config", "model.quantization"),
    ("load_in_4bit", "model.quantization"), ("attn_implementation", "model.attn_implementation"),
    ("device_map", "train.distributed"),
])
def test_init_kwargs_that_orpo_sets_name_the_key_to_use(key, instead):
    with pytest.raises(ConfigError, match=rf"model\.init_kwargs\.{key}: set {instead}"):
        load_config(raw={"model": {"name_or_path": "x", "init_kwargs": {key: "x"}}})


def test_init_kwargs_with_model_init_is_refused():
    with pytest.raises(ConfigError, match="model.init_kwargs"):
        load_config(raw={"model": {"init": {"hidden_size": 8}, "tokenizer": "t", "init_kwargs": {"a": 1}}})


# ---------------------------------------------------------------------------------------------
# model.quantization


def bnb(cfg: ModelConfig):
    return pretrained_kwargs(cfg)["quantization_config"]


def test_load_in_4bit_is_todays_4bit_nf4_double_quant(stories_dir):
    q = bnb(model_cfg(stories_dir, load_in_4bit=True, lora=LORA))
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant is True
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    assert q.bnb_4bit_compute_dtype == expected and q.bnb_4bit_quant_storage == torch.uint8
    assert "quantization_config" not in pretrained_kwargs(model_cfg(stories_dir, lora=LORA))


def test_each_quantization_key_is_one_bitsandbytes_argument(stories_dir):
    quant = {"bits": 4, "quant_type": "fp4", "double_quant": False, "compute_dtype": "float32",
             "storage_dtype": "bfloat16"}
    cfg = model_cfg(stories_dir, quantization=quant, lora=LORA)
    q = bnb(cfg)
    assert cfg.load_in_4bit
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert (q.bnb_4bit_compute_dtype, q.bnb_4bit_quant_storage) == (torch.float32, torch.bfloat16)
    eight = bnb(model_cfg(stories_dir, quantization={"bits": 8}, lora=LORA))
    assert eight.load_in_8bit and not eight.load_in_4bit


@pytest.mark.parametrize("quant, kind, quant_type", [
    ({"bits": 4, "quant_type": "fp4", "compute_dtype": "float32"}, "Linear4bit", "fp4"),
    ({"bits": 4, "compute_dtype": "float32"}, "Linear4bit", "nf4"),
    ({"bits": 8}, "Linear8bitLt", None),
])
def test_the_quantized_model_has_bitsandbytes_layers(quant, kind, quant_type, stories_dir):
    """bitsandbytes' CPU backend loads and runs them here (training them needs CUDA: check_qlora_available)."""
    cfg = model_cfg(stories_dir, quantization=quant, lora=LORA)
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), **pretrained_kwargs(cfg, {"": "cpu"}))
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == kind
    if quant_type is not None:
        assert layer.weight.quant_state.quant_type == quant_type
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("model, message", [
    ({"load_in_4bit": True, "quantization": {"bits": 8}}, "model.load_in_4bit=True contradicts"),
    ({"load_in_4bit": False, "quantization": {"bits": 4}}, "model.load_in_4bit=False contradicts"),
    ({"quantization": {"bits": 8, "quant_type": "fp4"}}, "model.quantization.quant_type is a 4-bit setting"),
    ({"quantization": {"bits": 3}}, "model.quantization.bits"),
])
def test_inconsistent_quantization_is_a_config_error(model, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={"model": {"name_or_path": "x", "lora": {}, **model}})


def test_quantization_trains_adapters_only():
    with pytest.raises(ConfigError, match=r"model\.quantization \(QLoRA\) trains adapters only"):
        load_config(raw={"model": {"name_or_path": "x", "quantization": {"bits": 8}}})
    with pytest.raises(ConfigError, match=r"model\.load_in_4bit \(QLoRA\) trains adapters only"):
        load_config(raw={"model": {"name_or_path": "x", "load_in_4bit": True}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_quantization_without_a_gpu_says_so(stories_dir, stories_tokenizer):
    with pytest.raises(ConfigError, match=r"model\.quantization \(QLoRA\) needs a CUDA GPU"):
        load_model(model_cfg(stories_dir, quantization={"bits": 8}, lora=LORA), stories_tokenizer)


# ---------------------------------------------------------------------------------------------
# model.gradient_checkpointing_kwargs


@pytest.mark.parametrize("kwargs, reentrant", [(None, False), ({"use_reentrant": True}, True),
                                               ({"use_reentrant": False, "preserve_rng_state": False}, False)])
def test_gradient_checkpointing_kwargs_reach_the_layers(kwargs, reentrant, stories_dir, stories_tokenizer):
    cfg = model_cfg(stories_dir, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    model = load_model(cfg, stories_tokenizer)
    func = model.model.layers[0]._gradient_checkpointing_func
    assert func.keywords["use_reentrant"] is reentrant
    assert func.keywords == ({"use_reentrant": False} if kwargs is None else kwargs)


def test_gradient_checkpointing_kwargs_are_checked(stories_dir, stories_tokenizer):
    with pytest.raises(ConfigError, match="needs model.gradient_checkpointing: true"):
        load_config(raw={"model": {"name_or_path": "x", "gradient_checkpointing_kwargs": {"use_reentrant": True}}})
    cfg = model_cfg(stories_dir, gradient_checkpointing=True, gradient_checkpointing_kwargs={"reentrant": True})
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing_kwargs\.reentrant: not an argument"):
        load_model(cfg, stories_tokenizer)


# ---------------------------------------------------------------------------------------------
# --dtype, --revision, --trust-remote-code on eval, generate, merge


def eval_json(capsys, *args: str) -> dict:
    rc = main(["eval", *args, "--data", str(PAIRS), "--max-samples", "4", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)[0]


def test_eval_dtype_reaches_the_model(stories_dir, capsys):
    auto = eval_json(capsys, "--model", str(stories_dir))
    assert eval_json(capsys, "--model", str(stories_dir), "--dtype", "float32")["logps_chosen"] == auto["logps_chosen"]
    half = eval_json(capsys, "--model", str(stories_dir), "--dtype", "bfloat16")
    assert half["logps_chosen"] != auto["logps_chosen"]


def make_adapter(base: str, folder: Path, stories_dir: Path) -> Path:
    """A LoRA adapter (B nonzero, so merging changes q_proj) whose base is ``base``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(stories_dir)),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / name, folder / name)
    return folder


def test_merge_dtype_is_the_written_dtype(stories_dir, tmp_path, capsys):
    adapter = make_adapter(str(stories_dir), tmp_path / "adapter", stories_dir)
    assert main(["merge", str(adapter), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    assert main(["merge", str(adapter), str(tmp_path / "full")]) == 0
    assert {t.dtype for t in load_file(tmp_path / "half" / "model.safetensors").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "full" / "model.safetensors").values()} == {torch.float32}


def hub_cache(tmp_path: Path, stories_dir: Path) -> tuple[Path, dict[str, Path]]:
    """A Hugging Face cache holding org/tiny at two revisions: main (stories260K) and other (its final
    norm doubled), and a local copy of each snapshot to compare with."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    snapshots = {}
    for ref, commit, scale in (("main", "a" * 40, 1.0), ("other", "b" * 40, 2.0)):
        folder = repo / "snapshots" / commit
        shutil.copytree(stories_dir, folder)
        weights = load_file(folder / "model.safetensors")
        weights["model.norm.weight"] = weights["model.norm.weight"] * scale
        from safetensors.torch import save_file

        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        (repo / "refs" / ref).write_text(commit)
        snapshots[ref] = folder
    return tmp_path / "hub", snapshots


def run_orpo(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    """``orpo`` in a process of its own: huggingface_hub reads HF_HUB_CACHE when it is imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "orpo.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_revision_loads_that_snapshot(stories_dir, tmp_path, capsys):
    cache, snapshots = hub_cache(tmp_path, stories_dir)
    local = {ref: eval_json(capsys, "--model", str(folder))["logps_chosen"] for ref, folder in snapshots.items()}
    assert local["main"] != local["other"]
    for revision in (None, "other"):
        flags = ["--revision", revision] if revision else []
        done = run_orpo(tmp_path, cache, "eval", "--model", "org/tiny", *flags, "--data", str(PAIRS),
                        "--max-samples", "4", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)[0]["logps_chosen"] == local[revision or "main"]
    missing = run_orpo(tmp_path, cache, "generate", "--model", "org/tiny", "--revision", "nope", "--prompt", "hi")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--model org/tiny" in missing.stderr and "revision 'nope', --revision" in missing.stderr


def test_merge_revision_is_the_base_revision(stories_dir, tmp_path):
    cache, snapshots = hub_cache(tmp_path, stories_dir)
    adapter = make_adapter("org/tiny", tmp_path / "adapter", stories_dir)
    for revision in ("main", "other"):
        done = run_orpo(tmp_path, cache, "merge", str(adapter), str(tmp_path / revision), "--revision", revision)
        assert done.returncode == 0, done.stderr
        merged = load_file(tmp_path / revision / "model.safetensors")["model.norm.weight"]
        assert torch.equal(merged, load_file(snapshots[revision] / "model.safetensors")["model.norm.weight"])


def test_revision_of_a_local_folder_is_refused(stories_dir, capsys):
    rc = main(["generate", "--model", str(stories_dir), "--revision", "v1", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "--revision v1" in err and "local folder" in err, err


MODELING = '''
from transformers import LlamaConfig, LlamaForCausalLM


class TinyConfig(LlamaConfig):
    model_type = "tiny_custom"


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def test_trust_remote_code_runs_the_folders_own_model_class(stories_dir, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(stories_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "modeling_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_tiny.py").write_text(MODELING)
    cache = tmp_path / "hub"
    refused = run_orpo(tmp_path, cache, "generate", "--model", str(custom), "--prompt", "hi", "--max-new-tokens", "2")
    assert refused.returncode == 2 and "runs only with --trust-remote-code" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    for command in (["generate", "--prompt", "hi", "--max-new-tokens", "2"],
                    ["eval", "--data", str(PAIRS), "--max-samples", "2", "--json"]):
        done = run_orpo(tmp_path, cache, command[0], "--model", str(custom), "--trust-remote-code", *command[1:])
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "modules" / "transformers_modules").is_dir()


def test_resume_across_changed_init_kwargs_is_refused(stories_dir, hh_path, tmp_path):
    """A rope change reshapes every step: resuming across it would be neither run."""
    from orpo.train import Trainer
    from orpo.train.resume import ResumeError

    def raw(**model):
        return {"model": {"name_or_path": str(stories_dir), **model},
                "data": {"train": str(hh_path), "max_length": 64, "max_samples": 8,
                         "cache_dir": str(tmp_path / "cache")},
                "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "save_every": 1,
                          "resume": "auto", "mixed_precision": "no"}}

    Trainer(load_config(raw=raw()), progress=False).setup().train()
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}
    changed = load_config(raw={**raw(init_kwargs={"rope_parameters": rope}),
                               "train": {**raw()["train"], "max_steps": 4}})
    with pytest.raises(ResumeError, match="model.init_kwargs: checkpoint {}, now"):
        Trainer(changed, progress=False).setup()
