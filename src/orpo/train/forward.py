"""How the model runs over a ``PreferenceBatch``: the one place where a training forward happens.

Objectives never call the model themselves. They say which targets they read (``keep_targets``,
on the CPU in the collate function) and get per-target token log-probs back (``token_logps``), so
a faster way to compute those log-probs (the LM head only where a target is read, or chunks of
rows with no full logits) serves every objective, and the objectives stay small math.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from orpo.data.collate import IGNORE_INDEX, PreferenceBatch
from orpo.loss import token_logps_from_logits


def keep_targets(batch: PreferenceBatch, read: torch.Tensor, keep_mode: str | None = None) -> PreferenceBatch:
    """Drop the targets outside ``read`` (a ``[N, T]`` bool mask), on the CPU before the batch moves.

    Why: prompt positions (most of an HH pair) need no log-prob, and with ``keep_mode`` the model
    skips the LM head there too (``logits_to_keep``; see ``model.logits_keep_mode``):
    ``"mask"`` keeps exactly the read positions of each row and flattens them, ``"positions"``
    keeps the columns where any row reads one. Both are exact: the LM head is per position.
    """
    labels = batch.labels.masked_fill(~read, IGNORE_INDEX)
    segment_ids = batch.segment_ids.masked_fill(~read, -1)
    response_mask = batch.response_mask & read
    inputs = dict(batch.inputs)
    if keep_mode == "mask":
        inputs["logits_to_keep"] = read
        labels, segment_ids, response_mask = labels[read], segment_ids[read], response_mask[read]
    elif keep_mode == "positions":
        cols = read.any(dim=0).nonzero().squeeze(1)
        inputs["logits_to_keep"] = cols
        labels, segment_ids, response_mask = labels[:, cols], segment_ids[:, cols], response_mask[:, cols]
    return replace(batch, inputs=inputs, labels=labels, segment_ids=segment_ids, response_mask=response_mask)


def token_logps(model, batch: PreferenceBatch) -> torch.Tensor:
    """log P(target) at every position of ``batch.labels`` (float32; 0 where there is no target)."""
    logits = model(**batch.inputs, use_cache=False).logits
    return token_logps_from_logits(logits, batch.labels)
