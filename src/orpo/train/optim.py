"""The optimizer (``train.optimizer``) with weight decay only where it belongs, its state size, and
the learning-rate schedule (``train.lr_scheduler``).

Every optimizer is a well-kept implementation: torch's AdamW and Adafactor, bitsandbytes' 8-bit and
paged AdamW and its Lion; bitsandbytes is imported only when one of its optimizers is asked for.
Every schedule is transformers' function of the step number only (a LambdaLR), so a resume that loads
its position (the checkpoint's scheduler.pt) continues it exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

from orpo.config import ConfigError, TrainConfig

# constructor arguments train.optimizer_kwargs may not set: orpo sets them (params, lr, ...), or they
# choose the implementation (bitsandbytes' optim_bits / is_paged are what train.optimizer names)
INTERNAL_ARGS = {"params", "lr", "args", "optim_bits", "is_paged", "fused", "foreach", "capturable", "differentiable"}


def _adam_hyper(cfg: TrainConfig) -> dict[str, Any]:
    return {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}


def _lion_hyper(cfg: TrainConfig) -> dict[str, Any]:
    return {"betas": (cfg.adam_beta1, cfg.adam_beta2)}


def _bnb(name: str) -> Callable[[], type[torch.optim.Optimizer]]:
    def load() -> type[torch.optim.Optimizer]:
        import bitsandbytes

        return getattr(bitsandbytes.optim, name)

    return load


def _bytes_adamw(p: torch.Tensor) -> int:
    return 2 * p.numel() * p.element_size()  # exp_avg and exp_avg_sq, in the parameter's dtype


def _bytes_8bit(p: torch.Tensor) -> int:
    """bitsandbytes keeps tensors under 4,096 elements (min_8bit_size) in float32; larger ones as two
    uint8 moments plus a float32 absmax per block of 256 per moment."""
    if p.numel() < 4096:
        return 8 * p.numel()
    return 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256)


def _bytes_adafactor(p: torch.Tensor) -> int:
    """torch's Adafactor: for a matrix a row and a column of second-moment statistics, else a full one."""
    if p.ndim < 2:
        return p.numel() * p.element_size()
    rows, cols = p.shape[-2:]
    return math.prod(p.shape[:-2]) * (rows + cols) * p.element_size()


@dataclass(frozen=True)
class OptimizerSpec:
    """How orpo builds one ``train.optimizer``."""

    label: str  # in the memory line
    load: Callable[[], type[torch.optim.Optimizer]]  # imported when asked for: bitsandbytes is optional
    hyper: Callable[[TrainConfig], dict[str, Any]]  # what orpo's own keys set, besides lr and weight_decay
    state_bytes: Callable[[torch.Tensor], int]  # optimizer state per trainable parameter
    package: str | None = None  # the pip package it needs beyond torch
    cuda_only: bool = False


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("AdamW", lambda: torch.optim.AdamW, _adam_hyper, _bytes_adamw),
    "adamw_8bit": OptimizerSpec("AdamW 8-bit", _bnb("AdamW8bit"), _adam_hyper, _bytes_8bit, "bitsandbytes"),
    # paged: the state lives in CUDA unified memory, which the driver pages out to the CPU under memory
    # pressure; there is no such memory on a CPU
    "paged_adamw_8bit": OptimizerSpec("paged AdamW 8-bit", _bnb("PagedAdamW8bit"), _adam_hyper, _bytes_8bit,
                                      "bitsandbytes", cuda_only=True),
    "paged_adamw_32bit": OptimizerSpec("paged AdamW", _bnb("PagedAdamW32bit"), _adam_hyper,
                                       lambda p: 8 * p.numel(), "bitsandbytes", cuda_only=True),
    "adafactor": OptimizerSpec("Adafactor", lambda: torch.optim.Adafactor, lambda cfg: {}, _bytes_adafactor),
    "lion": OptimizerSpec("Lion", _bnb("Lion"), _lion_hyper, lambda p: 4 * p.numel(), "bitsandbytes"),
}


def accepted_kwargs(cfg: TrainConfig, cls: type) -> list[str]:
    """The constructor arguments of ``cls`` that ``train.optimizer_kwargs`` may set."""
    taken = set(INTERNAL_ARGS) | {"weight_decay"} | set(OPTIMIZERS[cfg.optimizer].hyper(cfg))
    return [p for p in inspect.signature(cls).parameters if p not in taken]


def check_optimizer(cfg: TrainConfig, device: torch.device) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``cfg.optimizer``, or a ConfigError naming what is wrong: called at set-up,
    before the model loads, so a CUDA-only optimizer, a missing package or an unknown kwarg costs nothing."""
    spec = OPTIMIZERS[cfg.optimizer]
    if spec.cuda_only and device.type != "cuda":
        raise ConfigError(f"train.optimizer={cfg.optimizer} needs CUDA (its state is paged in CUDA unified "
                          f"memory) and this run is on {device.type}: use adamw_8bit or adamw")
    try:
        cls = spec.load()
    except ImportError as e:
        raise ConfigError(f"train.optimizer={cfg.optimizer} needs {spec.package}: pip install 'orpo[optim]' "
                          f"({e})") from e
    accepted = accepted_kwargs(cfg, cls)
    unknown = sorted(set(cfg.optimizer_kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"train.optimizer_kwargs: {', '.join(unknown)} is not an argument of {cfg.optimizer} "
                          f"({cls.__name__}); it accepts {', '.join(accepted) or 'none'} (lr, betas, eps and "
                          "weight_decay come from train.learning_rate, adam_beta1/2, adam_eps, weight_decay)")
    return cls


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and an undecayed group.

    No decay on 1-D parameters (norm gains, biases: decaying them pulls the norm scale towards 0 and
    changes nothing useful) nor on embedding tables (decay would shrink the vectors of rare tokens,
    which get few gradient updates to push back). Matrices of linear layers, LoRA A/B included, decay.
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the decay groups; AdamW takes the fused CUDA kernel when every trainable
    parameter is a floating CUDA tensor."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    device = params[0].device
    cls = check_optimizer(cfg, device)
    spec = OPTIMIZERS[cfg.optimizer]
    if spec.package == "bitsandbytes" and any(_is_dtensor(p) for p in params):
        raise ConfigError(f"train.optimizer={cfg.optimizer} (bitsandbytes) cannot step the sharded DTensor "
                          "parameters of fsdp2: use train.distributed=ddp, zero2 or zero3, or adamw / adafactor")
    kwargs = {"lr": cfg.learning_rate, **spec.hyper(cfg), **cfg.optimizer_kwargs}
    if cfg.optimizer == "adamw":
        # the fused kernel (CUDA, and the CPU's since torch 2.4) updates in place: the loop's sqrt
        # and division copies of each parameter (128 MiB at a 65k x 256 head and embedding) never
        # exist; on the CPU not under fp16's loss scaler, whose skipped steps it would hide
        cuda = all(p.is_cuda and p.is_floating_point() for p in params)
        cpu = cfg.mixed_precision != "fp16" and all(
            p.device.type == "cpu" and p.is_floating_point() and not _is_dtensor(p) for p in params)
        kwargs["fused"] = cuda or cpu or None
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.optimizer={cfg.optimizer}: {e} (from train.optimizer_kwargs "
                          f"{cfg.optimizer_kwargs} and the learning rate / beta / eps keys)") from e


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def optimizer_state_bytes(name: str, params: Sequence[torch.Tensor]) -> int:
    """The optimizer state ``name`` keeps for these trainable parameters (the memory estimate)."""
    return sum(OPTIMIZERS[name].state_bytes(p) for p in params)


def optimizer_label(name: str) -> str:
    return OPTIMIZERS[name].label


# ---------------------------------------------------------------------------------------------
# Schedules

# train.lr_scheduler -> transformers' name (constant with warmup becomes constant_with_warmup)
TRANSFORMERS_NAME = {"linear": "linear", "cosine": "cosine", "constant": "constant", "inverse_sqrt": "inverse_sqrt",
                     "cosine_with_min_lr": "cosine_with_min_lr", "wsd": "warmup_stable_decay"}
# arguments orpo sets itself, or that another train key owns (min_lr: use min_lr_ratio)
OWN_ARGS = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch", "num_decay_steps", "num_stable_steps",
            "min_lr", "min_lr_rate", "min_lr_ratio"}


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``warmup_steps``, or ``ceil(warmup_ratio * total_steps)``, or 0."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def _schedule(cfg: TrainConfig, warmup: int) -> tuple[str, Callable[..., Any]]:
    name = TRANSFORMERS_NAME[cfg.lr_scheduler]
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    # transformers types the table's values as `function`, which mypy does not take for a Callable
    return name, cast(Callable[..., Any], TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)])


def check_schedule(cfg: TrainConfig) -> None:
    """One ConfigError for a ``train.lr_scheduler_kwargs`` name the schedule does not take (at set-up)."""
    name, fn = _schedule(cfg, warmup_steps(cfg, 1))
    accepted = [p for p in inspect.signature(fn).parameters if p not in OWN_ARGS]
    unknown = sorted(set(cfg.lr_scheduler_kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"train.lr_scheduler_kwargs: {', '.join(unknown)} is not an argument of the "
                          f"{cfg.lr_scheduler} schedule (transformers' {fn.__name__}); it accepts "
                          f"{', '.join(accepted) or 'none'} (warmup comes from train.warmup_steps / warmup_ratio, "
                          "the floor from train.min_lr_ratio, the decay from train.decay_ratio)")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """transformers' schedule for ``lr_scheduler``, with linear warmup.

    ``constant`` with warmup is transformers' ``constant_with_warmup``; ``inverse_sqrt`` decays as
    ``1/sqrt(step)`` after the warmup (timescale = warmup, or 10,000 without warmup, as transformers).
    ``cosine_with_min_lr`` ends at ``min_lr_ratio`` x the peak; ``wsd`` holds the peak after warmup and
    decays over the last ``ceil(decay_ratio * total_steps)`` steps to ``min_lr_ratio`` x the peak.
    """
    check_schedule(cfg)
    warmup = warmup_steps(cfg, total_steps)
    name, fn = _schedule(cfg, warmup)
    args: dict[str, Any] = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    if name == "cosine_with_min_lr":
        args["min_lr_rate"] = cfg.min_lr_ratio
    elif name == "warmup_stable_decay":
        decay = math.ceil(cfg.decay_ratio * total_steps)
        if warmup + decay > total_steps:
            raise ConfigError(f"train.lr_scheduler=wsd: {warmup} warmup + {decay} decay steps (decay_ratio "
                              f"{cfg.decay_ratio}) are more than the run's {total_steps} steps: lower "
                              "train.warmup_steps / warmup_ratio or train.decay_ratio")
        args |= {"num_decay_steps": decay, "min_lr_ratio": cfg.min_lr_ratio}
    # each function takes its own subset (constant takes no step counts, inverse_sqrt no total)
    accepted = inspect.signature(fn).parameters
    args = {k: v for k, v in args.items() if k in accepted}
    try:
        return fn(optimizer, **args, **cfg.lr_scheduler_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.lr_scheduler={cfg.lr_scheduler}: {e} (from train.lr_scheduler_kwargs "
                          f"{cfg.lr_scheduler_kwargs})") from e
