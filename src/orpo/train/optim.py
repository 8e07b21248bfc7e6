"""AdamW with weight decay only where it belongs, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler

from orpo.config import TrainConfig


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel when every trainable parameter is a floating CUDA tensor."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=fused or None)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``warmup_steps``, or ``ceil(warmup_ratio * total_steps)``, or 0."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """transformers' schedule for ``lr_scheduler``, with linear warmup.

    ``constant`` with warmup is transformers' ``constant_with_warmup``; ``inverse_sqrt`` decays as
    ``1/sqrt(step)`` after the warmup (timescale = warmup, or 10,000 without warmup, as transformers).
    """
    warmup = warmup_steps(cfg, total_steps)
    name: str = cfg.lr_scheduler
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
