"""Engine choice, the plugins orpo builds for Accelerate, examples/accelerate/*.yaml as `accelerate
launch` reads them, and the memory estimate. No process group, no training: fast."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orpo.config import ConfigError, load_config
from orpo.train.distributed import (
    Engine,
    build_engine,
    deepspeed_plugin,
    estimate_memory,
    fsdp2_plugin,
    launcher_engine,
    resolve_engine,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def _cfg(**train):
    return load_config(raw={"model": {"init": {"arch": "llama"}, "tokenizer": "x"}, "data": {"train": "x.jsonl"},
                            "train": train})


def _launch_env(yaml_file: Path) -> tuple[dict[str, str], int]:
    """The environment `accelerate launch --config_file yaml_file` gives each process, and its count."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(yaml_file), "-m", "orpo.cli", "train", "c.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return env, args.num_processes


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_each_accelerate_example_selects_its_engine(name):
    env, processes = _launch_env(EXAMPLES / f"{name}.yaml")
    assert processes == 8
    assert resolve_engine("auto", processes, env) == name
    assert resolve_engine(name, processes, env) == name
    other = "fsdp2" if name != "fsdp2" else "zero3"
    if name != "ddp":
        with pytest.raises(ConfigError, match=f"train.distributed is '{other}' but the accelerate config launched"):
            resolve_engine(other, processes, env)


def test_the_examples_folder_holds_exactly_the_four_engines():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == ["ddp", "fsdp2", "zero2", "zero3"]


def test_engine_resolution_without_a_launcher_config():
    assert resolve_engine("auto", 1, {}) == "single"
    assert resolve_engine("auto", 2, {}) == "ddp"
    assert resolve_engine("ddp", 1, {}) == "single"
    assert resolve_engine("fsdp2", 1, {}) == "fsdp2"
    with pytest.raises(ConfigError, match="FSDP version 1; orpo runs FSDP2 only"):
        launcher_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        launcher_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})


def test_impossible_engine_requests_are_clear_errors():
    with pytest.raises(ConfigError, match="train.cpu_offload needs a sharding engine"):
        build_engine(_cfg(cpu_offload=True), env={})
    with pytest.raises(ConfigError, match="needs a distributed launch, even for one process"):
        build_engine(_cfg(distributed="fsdp2"), env={})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="zero3 runs on CUDA GPUs only"):
            build_engine(_cfg(distributed="zero3"), env={"LOCAL_RANK": "0"})


def test_the_fsdp2_plugin_orpo_builds():
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = fsdp2_plugin(cpu_offload=True, rank0_loads=True)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.cpu_ram_efficient_loading is True  # rank 0 loads, the others receive its weights
    assert plugin.activation_checkpointing is False  # model.gradient_checkpointing does it, in every engine
    assert not isinstance(fsdp2_plugin(cpu_offload=False).cpu_offload, CPUOffloadPolicy)


@pytest.mark.parametrize(("stage", "offload"), [(2, False), (2, True), (3, False), (3, True)])
def test_the_deepspeed_plugin_orpo_builds(stage, offload):
    """DeepSpeed is not installed here: the plugin (Accelerate's own code) and its config are."""
    cfg = _cfg(grad_accum=4, max_grad_norm=0.5)
    ds = deepspeed_plugin(stage, cfg, cpu_offload=offload).deepspeed_config
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert zero["offload_optimizer"]["device"] == ("cpu" if offload else "none")
    assert zero["offload_param"]["device"] == ("cpu" if offload and stage == 3 else "none")
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.batch_size


def test_the_memory_estimate_divides_what_the_engine_shards():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 1024, bias=False))
    model[0].weight.requires_grad_(False)  # half the weights frozen: gradients and AdamW for the other half
    mib = 2**20

    def estimate(name, n, offload=False):
        accelerator = SimpleNamespace(num_processes=n, device=torch.device("cpu"))
        return estimate_memory(model, Engine(name=name, accelerator=accelerator, cpu_offload=offload))

    ddp = estimate("ddp", 4)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (8 * mib, 4 * mib, 8 * mib)
    fsdp = estimate("fsdp2", 4)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (2 * mib, 1 * mib, 2 * mib)
    zero2 = estimate("zero2", 4)
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == (8 * mib, 1 * mib, 2 * mib)
    assert estimate("fsdp2", 4, offload=True).on_device == 0
    line = fsdp.line(Engine(name="fsdp2", accelerator=SimpleNamespace(num_processes=4, device="cpu")))
    assert line.startswith("memory per process (fsdp2, 4 processes): weights 2.0 MiB, gradients 1.0 MiB, AdamW 2.0 MiB")
    too_big = estimate("ddp", 1)
    too_big.capacity = 1
    assert not too_big.fits and "WARNING: this will not fit" in too_big.line(Engine("ddp", SimpleNamespace(
        num_processes=1, device="cpu")))
