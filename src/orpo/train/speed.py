"""The speed switches users expect from other trainers: ``train.torch_compile``,
``train.use_liger_kernel`` and ``train.neftune_noise_alpha`` (NEFTune).

``apply_speed_switches`` runs once in setup, on the loaded model before the engine wraps it, and
hands back a ``Watcher`` that undoes what it did when the run ends (a model object given to the
trainer is trained in place, so it must not keep a hook or a compiled forward).
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from orpo.config import ConfigError
from orpo.train.model import base_model
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.config import TrainConfig
    from orpo.train.trainer import Trainer

LIGER_MISSING = ("train.use_liger_kernel needs a CUDA GPU and the liger_kernel package "
                 "(`pip install liger-kernel`)")


def apply_speed_switches(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Watcher:
    """Liger's kernels, the NEFTune hook, then compilation (last, so it traces the hook too)."""
    if cfg.use_liger_kernel:
        apply_liger_kernel(model, device)
    undo = SpeedUndo()
    if cfg.neftune_noise_alpha is not None:
        undo.handles.append(add_neftune_hook(model, cfg.neftune_noise_alpha))
    if cfg.torch_compile:
        compile_in_place(model)
        undo.compiled.append(model)
    return undo


class SpeedUndo(Watcher):
    """Removes the NEFTune hook and the compiled forward however the run ends."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.compiled: list[nn.Module] = []

    def on_close(self, trainer: Trainer) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.compiled:
            module._compiled_call_impl = None
        self.handles, self.compiled = [], []


def compile_in_place(model: nn.Module) -> None:
    """``nn.Module.compile``: the module's own ``__call__`` is compiled, so no ``OptimizedModule``
    wrapper exists and no ``_orig_mod.`` prefix can reach a state dict, checkpoint or saved file."""
    model.compile()


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def apply_liger_kernel(model: nn.Module, device: torch.device) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on this model instance; its fused linear cross
    entropy stays off (orpo's chunked head computes the log-probs).

    Unverified here: no GPU test ran this path; the CPU error below is what the tests check.
    """
    if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(LIGER_MISSING)
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base_model(model), rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def neftune_noise(embeds: torch.Tensor, alpha: float) -> torch.Tensor:
    """Uniform noise in [-1, 1] times alpha / sqrt(L * d) (Jain et al. 2023, as TRL), L the batch's
    sequence length and d the hidden size."""
    seq_len, hidden = embeds.shape[-2], embeds.shape[-1]
    scale = alpha / math.sqrt(seq_len * hidden)
    return torch.zeros_like(embeds).uniform_(-scale, scale)


def add_neftune_hook(model: nn.Module, alpha: float) -> Any:
    """A forward hook on the input embeddings of the transformers model (under PEFT too) that adds
    NEFTune noise while the module is in training mode, so eval, generation and the reference pass
    (``model.eval()``) see the clean embeddings."""
    inner: Any = base_model(model)
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        raise ConfigError(f"train.neftune_noise_alpha: {type(inner).__name__} has no input embeddings")

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        return output + neftune_noise(output, alpha)

    return embeddings.register_forward_hook(hook)
