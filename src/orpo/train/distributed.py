"""How a run spreads over processes: the engine (single, ddp, fsdp2, zero2, zero3) and everything
that depends on it, so the trainer's loop reads the same whatever the engine.

``train.distributed: auto`` takes what the launcher says (``accelerate launch`` with an FSDP or
DeepSpeed config sets ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), else DDP when there
are several processes, else a single process. An explicit value that contradicts the launcher is
refused rather than silently overridden.

    engine   what is sharded over the N processes              through
    single   nothing (one process)                              plain PyTorch
    ddp      nothing: every process holds everything           Accelerate (DistributedDataParallel)
    fsdp2    weights, gradients, AdamW state                    Accelerate's FSDP plugin (fsdp_version 2)
                                                                on GPUs; ``fully_shard`` here on the CPU,
                                                                where Accelerate has no FSDP
    zero2    gradients, AdamW state                             Accelerate's DeepSpeed plugin
    zero3    weights, gradients, AdamW state                    Accelerate's DeepSpeed plugin

FSDP2 wraps each decoder layer (the model's ``_no_split_modules``) and then the whole model, so one
layer's full weights exist at a time. Activation checkpointing is ``model.gradient_checkpointing``
in every engine; ``train.cpu_offload`` moves what the engine shards to the CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from orpo.config import Config, ConfigError
from orpo.train.optim import optimizer_label, optimizer_state_bytes

ENGINES = ("single", "ddp", "fsdp2", "zero2", "zero3")
# What the launcher asked for: the environment before any run of this process created an
# Accelerator (given a plugin, Accelerate writes ACCELERATE_USE_FSDP / _DEEPSPEED into os.environ,
# which a second run in the same process must not mistake for an accelerate config).
LAUNCH_ENV: dict[str, str] = dict(os.environ)
SHARDED = ("fsdp2", "zero3")  # weights sharded: the final model must be gathered


def launcher_engine(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The engine an ``accelerate launch --config_file`` asked for (None: the launcher says nothing)."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; orpo runs FSDP2 only: "
                              "set fsdp_config.fsdp_version: 2 (see examples/accelerate/fsdp2.yaml)")
        return "fsdp2"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise ConfigError(f"the accelerate config asks for DeepSpeed ZeRO stage {stage}; orpo runs stages 2 "
                              "and 3 (see examples/accelerate/zero2.yaml, zero3.yaml)")
        return f"zero{stage}"
    return None


def resolve_engine(requested: str, num_processes: int, env: dict[str, str] | os._Environ = os.environ) -> str:
    """``train.distributed`` resolved against the launcher and the process count."""
    launched = launcher_engine(env)
    if requested == "auto":
        return launched or ("ddp" if num_processes > 1 else "single")
    if launched is not None and launched != requested:
        raise ConfigError(f"train.distributed is {requested!r} but the accelerate config launched {launched!r}: "
                          "make them agree (or set train.distributed=auto)")
    if requested == "ddp" and num_processes == 1:
        return "single"
    return requested


def offload_from_launcher(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """True when the accelerate config asked for CPU offload (it then counts as ``train.cpu_offload``)."""
    return (env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
            or env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
            or env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu")


# ---------------------------------------------------------------------------------------------
# Accelerate plugins


def rank0_loads_weights(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """True when transformers loads pretrained weights on local rank 0 only (the others get empty
    "meta" tensors): what ``accelerate launch`` with an FSDP config asks for by default. The FSDP
    plugin must then broadcast rank 0's weights (``cpu_ram_efficient_loading``), or the other
    ranks would train on empty weights."""
    return (env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true")


def fsdp2_plugin(cpu_offload: bool, rank0_loads: bool = False, mixed_precision: str = "no"):
    """Accelerate's FSDP plugin for FSDP2: per-decoder-layer wrapping, resharded after forward.

    Activation checkpointing stays with transformers (``model.gradient_checkpointing``) so it is
    one mechanism in every engine; the state dict type is unused (checkpoints go through
    ``torch.distributed.checkpoint`` in ``checkpoint.py``). Under bf16/fp16 the gradients are
    still reduced in float32, as ``shard_model`` does: left to itself Accelerate reduces them in
    the 16-bit dtype, so the GPU run would sum them less precisely than the CPU one.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_offload=cpu_offload, activation_checkpointing=False, cpu_ram_efficient_loading=rank0_loads,
        state_dict_type="SHARDED_STATE_DICT", mixed_precision_policy=fsdp2_mixed_precision(mixed_precision),
    )


def fsdp2_mixed_precision(mixed_precision: str):
    """FSDP2's policy for ``train.mixed_precision``: 16-bit compute, float32 gradient reduction
    (None without mixed precision: the weights' own dtype throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if param_dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=param_dtype)


def process_group_backend(engine: str, cpu_offload: bool, cuda: bool) -> str | None:
    """The backend the process group needs (None: Accelerate's default). FSDP2 with CPU offload
    on GPUs clips gradients that live on the CPU, which NCCL alone cannot reduce: add gloo."""
    if engine == "fsdp2" and cpu_offload and cuda:
        return "cuda:nccl,cpu:gloo"
    return None


def deepspeed_plugin(stage: int, cfg: Config, cpu_offload: bool):
    """Accelerate's DeepSpeed plugin for ZeRO ``stage``; the values come from the orpo config.

    DeepSpeed accumulates gradients itself (``grad_accum`` micro-batches per step) and clips them
    (``max_grad_norm``). ZeRO-3 gathers the 16-bit weights for ``final/``.
    """
    from accelerate.utils import DeepSpeedPlugin

    t = cfg.train
    plugin = DeepSpeedPlugin(
        zero_stage=stage, gradient_accumulation_steps=t.grad_accum, gradient_clipping=t.max_grad_norm or 0.0,
        offload_optimizer_device="cpu" if cpu_offload else "none",
        offload_param_device="cpu" if cpu_offload and stage == 3 else "none",
        zero3_init_flag=False, zero3_save_16bit_model=stage == 3,
    )
    # orpo feeds its own micro-batches (no prepared DataLoader for Accelerate to read the size from)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    return plugin


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class Engine:
    """The chosen engine, its Accelerator, and the few operations that differ between engines."""

    name: str
    accelerator: Accelerator
    cpu_offload: bool = False
    direct_fsdp: bool = False  # fully_shard applied here (CPU), not by Accelerate
    torch_optimizer: Any = None  # set by prepare()

    @property
    def sharded(self) -> bool:
        """Weights sharded over the processes (``final/`` gathers them)."""
        return self.name in SHARDED

    @property
    def deepspeed(self) -> bool:
        return self.name.startswith("zero")

    @property
    def places_model(self) -> bool:
        """False when the engine moves the model to the device itself, shard by shard."""
        return self.name in ("single", "ddp")

    def describe(self) -> str:
        n = self.accelerator.num_processes
        if self.name == "single":
            return "engine: single process"
        what = {"ddp": "DDP (nothing sharded)", "fsdp2": "FSDP2 (weights, gradients, AdamW state sharded)",
                "zero2": "DeepSpeed ZeRO-2 (gradients, AdamW state sharded)",
                "zero3": "DeepSpeed ZeRO-3 (weights, gradients, AdamW state sharded)"}[self.name]
        return f"engine: {self.name} over {n} process{'es' if n > 1 else ''}: {what}" + (
            ", CPU offload" if self.cpu_offload else "")

    def prepare(self, model, make_optimizer: Callable[[Any], torch.optim.Optimizer]):
        """Wrap the model for the engine and build its optimizer; returns ``(model, optimizer)``.

        ``make_optimizer(model)`` is called on the model the optimizer must see: after
        ``fully_shard`` on the direct path (the parameters are new DTensors), before Accelerate's
        wrapping otherwise (Accelerate swaps the parameters inside the optimizer itself). The
        plain torch optimizer stays in ``torch_optimizer`` (schedulers and checkpoints need it).
        """
        acc = self.accelerator
        if self.direct_fsdp:
            model = shard_model(model, self.cpu_offload, acc.mixed_precision)
            self.torch_optimizer = make_optimizer(model)
            # evaluation_mode: only the autocast wrapper (mixed precision), never a DDP wrapper.
            return acc.prepare_model(model, evaluation_mode=True), self.torch_optimizer
        self.torch_optimizer = make_optimizer(model)
        model, optimizer = acc.prepare(model, self.torch_optimizer)
        if self.name == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(model, FSDPModule):  # a key that silently does nothing is the worst bug
                raise RuntimeError("train.distributed=fsdp2 but Accelerate did not shard the model")
        return model, optimizer

    def micro_batch(self, model, last: bool):
        """The context of one micro-batch's forward and backward: gradients are communicated (and,
        under DeepSpeed, the optimizer steps) only after the ``last`` micro-batch of a step."""
        if self.deepspeed:
            # DeepSpeed counts micro-batches itself (gradient_accumulation_steps = train.grad_accum).
            return self.accelerator.accumulate(model)
        if last:
            return contextlib.nullcontext()
        if self.direct_fsdp:
            return _fsdp_no_sync(model)
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """Backward of a loss already divided by the step's global token and pair counts.

        DDP, FSDP and ZeRO average the gradients over processes: multiply by the process count to
        get the global sum back. DeepSpeed also divides each micro-batch's loss by the number of
        micro-batches it accumulates: multiply that back too.
        """
        scale = self.accelerator.num_processes * (grad_accum if self.deepspeed else 1)
        self.accelerator.backward(loss * scale)

    def clip_grad_norm_(self, model, max_norm: float | None) -> torch.Tensor:
        """Clip the global gradient norm; return it as a plain float32 tensor on the accelerator's
        device, whatever the engine and Accelerate version, so the trainer can stack it with the
        loss and read it with ``tolist()`` (which a DTensor refuses).

        Under DeepSpeed the engine clips (``gradient_clipping``) inside its step and reports the norm.
        """
        acc = self.accelerator
        if self.deepspeed:
            norm = acc.clip_grad_norm_(model.parameters(), max_norm or math.inf)
            norm = torch.tensor(float("nan") if norm is None else float(norm))
        elif self.direct_fsdp:
            params = [p for p in model.parameters() if p.grad is not None]
            norm = _plain(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0))
            torch.nn.utils.clip_grads_with_norm_(params, max_norm or math.inf, norm)
        else:
            norm = acc.clip_grad_norm_(model.parameters(), max_norm or math.inf)
        return _plain(norm).to(device=acc.device, dtype=torch.float32)

    def unwrap(self, model):
        """The model without DDP/DeepSpeed wrappers (FSDP2 shards in place: the model itself)."""
        return self.accelerator.unwrap_model(model)


def _plain(norm: torch.Tensor) -> torch.Tensor:
    """The norm as a plain tensor: a DTensor gathered (Accelerate 1.15 returns FSDP2's sharded
    norm as one), any other tensor subclass stripped to its data."""
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if type(norm) is not torch.Tensor:
        norm = norm.as_subclass(torch.Tensor)
    return norm


@contextlib.contextmanager
def _fsdp_no_sync(model) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def build_engine(cfg: Config, env: dict[str, str] | None = None) -> Engine:
    """Resolve ``train.distributed`` and create the Accelerator that runs it."""
    t = cfg.train
    env = LAUNCH_ENV if env is None else env
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):  # a previous run's, not the launcher's
        if key not in LAUNCH_ENV:
            os.environ.pop(key, None)
    world = int(env.get("WORLD_SIZE", "1"))
    name = resolve_engine(t.distributed, world, env)
    cpu_offload = t.cpu_offload or offload_from_launcher(env)
    if cpu_offload and name in ("single", "ddp"):
        raise ConfigError(f"train.cpu_offload needs a sharding engine (fsdp2, zero2, zero3); this run is {name}")
    cuda = torch.cuda.is_available()
    if name in SHARDED + ("zero2",) and "LOCAL_RANK" not in env:
        raise ConfigError(f"train.distributed={name} needs a distributed launch, even for one process: "
                          "torchrun --nproc_per_node N -m orpo.cli train ... or accelerate launch "
                          "--config_file examples/accelerate/<engine>.yaml -m orpo.cli train ...")
    if cfg.model.load_in_4bit and name != "single" and name != "ddp":
        raise ConfigError(f"model.load_in_4bit (QLoRA) under {name} is not supported: bitsandbytes' 4-bit weights "
                          "must be stored as bf16 (bnb_4bit_quant_storage) to be sharded, which orpo does not set "
                          "up yet. Use train.distributed=ddp, or LoRA without 4-bit under fsdp2/zero3.")
    kwargs: dict[str, Any] = {"mixed_precision": t.mixed_precision}
    direct = False
    if name.startswith("zero"):
        import importlib.util

        if not cuda:
            raise ConfigError(f"train.distributed={name} runs on CUDA GPUs only (DeepSpeed); this machine has none. "
                              "Use fsdp2 or ddp.")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"train.distributed={name} needs DeepSpeed: pip install deepspeed")
        kwargs["deepspeed_plugin"] = deepspeed_plugin(int(name[-1]), cfg, cpu_offload)
        kwargs["gradient_accumulation_steps"] = t.grad_accum
    elif name == "fsdp2" and cuda:
        kwargs["fsdp_plugin"] = fsdp2_plugin(cpu_offload, rank0_loads_weights(os.environ), t.mixed_precision)
    elif name == "fsdp2":
        direct = True  # Accelerate has no FSDP on the CPU: fully_shard ourselves
        if rank0_loads_weights(os.environ):
            raise ConfigError("FSDP_CPU_RAM_EFFICIENT_LOADING (loading weights on rank 0 only) needs GPUs; "
                              "on the CPU launch with torchrun and train.distributed=fsdp2")
    # cpu=True only where there is no accelerator at all: without it Accelerate ignores a torchrun
    # launch on a CPU-only machine (each process trains alone, as rank 0 of 1).
    kwargs["cpu"] = not cuda and not torch.backends.mps.is_available()
    backend = process_group_backend(name, cpu_offload, cuda)
    if backend is not None:
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend)]
    # Accelerate keeps one state per process; a second run in the same process (a notebook, the
    # tests) with another precision or engine would be refused otherwise. The process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    group_existed = dist.is_available() and dist.is_initialized()
    accelerator = Accelerator(**kwargs)
    if not group_existed and dist.is_available() and dist.is_initialized():
        atexit.register(_end_process_group)
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(f"launched with WORLD_SIZE={world} but Accelerate sees {accelerator.num_processes} processes")
    return Engine(name=name, accelerator=accelerator, cpu_offload=cpu_offload, direct_fsdp=direct)


def _end_process_group() -> None:
    """At exit, on every rank, end the process group the first run of this process started, while
    Python can still run its threads. Left to interpreter teardown, a gloo worker thread still
    releasing the tensors of the last collective needs the GIL and is killed for it: SIGABRT
    ("terminate called without an active exception") in about one 2-process run in ten, which fails
    the whole torchrun launch. The collection first drops what still holds the group (a wrapped
    model in a reference cycle), so destroying it joins those threads now."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def full_state_dict(engine: Engine, model) -> dict[str, Any] | None:
    """The whole model's weights on the main process, gathered from the shards (every rank calls
    this); None where the unwrapped model already holds them all (single, ddp, zero2)."""
    if engine.name == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if engine.name == "zero3":
        return engine.accelerator.get_state_dict(model)  # stage3_gather_16bit_weights_on_model_save
    return None


# ---------------------------------------------------------------------------------------------
# FSDP2 on the CPU (Accelerate does this on GPUs)


def decoder_layer_classes(model) -> tuple[type[torch.nn.Module], ...]:
    """The classes transformers marks as not to be split (the decoder layers): one FSDP unit each."""
    from orpo.train.model import base_model

    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"fsdp2: {type(base_model(model)).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by")
    return tuple(classes)


def shard_model(model, cpu_offload: bool, mixed_precision: str):
    """``fully_shard`` each decoder layer, then the whole model (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not torch.distributed.is_initialized():
        raise ConfigError("train.distributed=fsdp2 needs a distributed launch (torchrun), even for one process")
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    layers = decoder_layer_classes(model)
    for module in list(model.modules()):
        if isinstance(module, layers):
            fully_shard(module, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(model, mp_policy=mp_policy, offload_policy=offload)
    return model


# ---------------------------------------------------------------------------------------------
# Memory estimate


@dataclass
class MemoryEstimate:
    """Bytes per process for weights, gradients and optimizer state (activations not included)."""

    weights: int
    gradients: int
    optimizer: int
    on_device: int  # what stays on the accelerator (all of it unless offloaded)
    capacity: int | None  # what the device has (None: unknown)
    where: str
    optimizer_label: str = "AdamW"

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.on_device <= self.capacity

    def line(self, engine: Engine) -> str:
        n = engine.accelerator.num_processes
        text = (f"memory per process ({engine.name}, {n} process{'es' if n > 1 else ''}): weights "
                f"{_gib(self.weights)}, gradients {_gib(self.gradients)}, {self.optimizer_label} {_gib(self.optimizer)}; "
                f"{_gib(self.on_device)} on {self.where} before activations")
        if self.capacity is not None:
            text += f" (it has {_gib(self.capacity)})"
        if not self.fits:
            text += (". WARNING: this will not fit: shard more (fsdp2 or zero3, more processes), "
                     "train.cpu_offload=true, LoRA, or a bf16 model.dtype")
        return text


def estimate_memory(model, engine: Engine, optimizer: str = "adamw") -> MemoryEstimate:
    """Weights, gradients (trainable only) and the optimizer's state (AdamW: two moments; 8-bit: ~2 bytes
    a parameter; Adafactor: a row and a column per matrix; Lion: one moment), divided by what the engine
    shards."""
    n = engine.accelerator.num_processes
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable_params)
    optim = optimizer_state_bytes(optimizer, trainable_params)
    shard_w = n if engine.name in SHARDED else 1
    shard_go = n if engine.name in ("fsdp2", "zero2", "zero3") else 1
    weights, grads, optim = math.ceil(weights / shard_w), math.ceil(grads / shard_go), math.ceil(optim / shard_go)
    on_device = weights + grads + optim
    if engine.cpu_offload:
        on_device = {"fsdp2": 0, "zero2": weights + grads, "zero3": grads}.get(engine.name, on_device)
    device = engine.accelerator.device
    return MemoryEstimate(weights, grads, optim, on_device, _capacity(device, engine.accelerator), str(device),
                          optimizer_label(optimizer))


def _capacity(device: torch.device, accelerator: Accelerator) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                meminfo = dict(line.split(":", 1) for line in f)
        except OSError:
            return None
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return available // max(local, 1)
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
