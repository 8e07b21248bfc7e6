"""Batch layouts: how tokenized pairs become one forward input.

A layout turns a list of tokenized rows (``chosen_input_ids``, ``chosen_prompt_len``,
``rejected_input_ids``, ``rejected_prompt_len``) into a ``PreferenceBatch``. The loss never sees
the layout: it only needs, for every position of the model's output, the target token, the
sequence that target belongs to and whether it is a response token. So a padding-free packed
layout or a prompt-shared layout (``[prompt][chosen][rejected]`` with a 4D mask) is one new class
here, with no change to the loss or the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from orpo.loss import nll_target_mask

IGNORE_INDEX = -100


@dataclass
class PreferenceBatch:
    """One forward input for ``num_pairs`` pairs, chosen and rejected together.

    ``labels[n, t]`` is the token that position ``t`` of row ``n`` must predict (already shifted),
    −100 where there is none. ``segment_ids[n, t]`` is the sequence that target belongs to: chosen
    of pair ``i`` → ``i``, rejected of pair ``i`` → ``num_pairs + i``, −1 for none.
    ``response_mask[n, t]`` marks targets that are response tokens (prompt targets are False).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    segment_ids: torch.Tensor
    response_mask: torch.Tensor
    num_pairs: int

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            inputs={k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            labels=self.labels.to(device, non_blocking=True),
            segment_ids=self.segment_ids.to(device, non_blocking=True),
            response_mask=self.response_mask.to(device, non_blocking=True),
            num_pairs=self.num_pairs,
        )

    def num_nll_tokens(self, nll_on_prompt: bool = False) -> int:
        """Targets the NLL averages over (chosen response, plus chosen prompt if asked)."""
        return int(nll_target_mask(self.segment_ids, self.response_mask, self.num_pairs, nll_on_prompt).sum())

    def num_tokens(self) -> int:
        """Real (non-pad) input tokens, for throughput."""
        return int(self.inputs["attention_mask"].sum())


class Layout(Protocol):
    """Collates tokenized rows into a PreferenceBatch; usable as a DataLoader ``collate_fn``."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> PreferenceBatch: ...


@dataclass
class PaddedLayout:
    """2B right-padded rows: chosen sequences first, then rejected (TRL's concatenated layout).

    Simple and supported by every model and attention backend; pays for padding. Rows are padded
    to the longest sequence in the batch (rounded up to ``pad_to_multiple_of``).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> PreferenceBatch:
        b = len(rows)
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        prompt_lens = [r["chosen_prompt_len"] for r in rows] + [r["rejected_prompt_len"] for r in rows]
        t = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            t = (t + m - 1) // m * m
        n = len(seqs)
        input_ids = torch.full((n, t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.full((n, t), -1, dtype=torch.long)
        response_mask = torch.zeros((n, t), dtype=torch.bool)
        for i, (seq, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
            ids = torch.as_tensor(seq, dtype=torch.long)
            L = ids.numel()
            input_ids[i, :L] = ids
            attention_mask[i, :L] = 1
            # position j predicts token j+1; the target is a response token when j+1 >= prompt_len
            labels[i, : L - 1] = ids[1:]
            segment_ids[i, : L - 1] = i
            response_mask[i, max(p - 1, 0) : L - 1] = True
        return PreferenceBatch(
            inputs={"input_ids": input_ids, "attention_mask": attention_mask},
            labels=labels,
            segment_ids=segment_ids,
            response_mask=response_mask,
            num_pairs=b,
        )
