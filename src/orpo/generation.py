"""Batched generation: many prompts at once, left-padded, equal token for token to one at a time.

Every place that makes a model write (``train.eval_generate``, ``orpo generate --prompts``, and
what compares or benchmarks models) goes through ``generate``. Prompts are sorted by length and cut
into batches so a batch pads little; each batch is left-padded (the new tokens of every row then
start at the same column) with an attention mask, and the positions come from the mask, so a
padded row sees exactly what it would see alone. Completions end after their first EOS.

``lockstep``: a sharded model (FSDP2, ZeRO-3) gathers its weights in every forward on all ranks,
so every rank must run the same forwards: each batch takes exactly ``max_new_tokens`` steps (no
early stop at an EOS that one rank could reach alone), with our own KV-cache loop.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise sampled with ``top_p``, seeded by ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


GREEDY = Sampling()


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, pad_token_id: int | None,
             eos_token_id: int | None, device: torch.device | str | None = None, batch_size: int = 16,
             sampling: Sampling = GREEDY, lockstep: bool = False) -> list[list[int]]:
    """The new token ids of each prompt's completion, in the prompts' order (EOS kept, nothing after it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: a completion needs at least one token to start from")
    if lockstep and not sampling.greedy:
        raise ValueError("lockstep generation is greedy only (every rank must pick the same tokens)")
    device = device if device is not None else next(model.parameters()).device
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [device]):
            torch.manual_seed(sampling.seed)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                input_ids, mask = left_pad([prompts[i] for i in rows], pad, device)
                if lockstep:
                    new = _lockstep_greedy(model, input_ids, mask, max_new_tokens)
                else:
                    new = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         pad_token_id=pad, eos_token_id=eos_token_id, use_cache=True,
                                         **sampling.generate_kwargs())[:, input_ids.shape[1]:]
                for i, ids in zip(rows, new.tolist(), strict=True):
                    out[i] = cut_at_eos(ids, eos_token_id)
    finally:
        model.train(was_training)
    return out


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` token ids padded on the left, and the attention mask (0 on the padding)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """A row of new tokens up to and including its first EOS (what follows is the batch's padding)."""
    if eos_token_id is not None and eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    return ids


def _cache_name(model) -> str:
    """The KV cache's keyword: transformers >= 5.25 calls it ``cache`` (``past_key_values`` deprecated), 5.17 the old name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _lockstep_greedy(model, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Exactly ``max_new_tokens`` greedy steps with the KV cache: the same forwards on every rank."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = _cache_name(model)
    new = []
    for i in range(max_new_tokens):
        token = result.logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        if i + 1 < max_new_tokens:
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            result = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{cache: getattr(result, cache)})
    return torch.cat(new, dim=1)
