"""Evaluation over a whole tokenized preference set: the trainer's periodic eval and ``orpo eval``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from orpo.data.collate import Layout, PaddedLayout, pair_tokens
from orpo.loss import sequence_logps
from orpo.train.forward import token_logps
from orpo.train.model import ensure_pad_token, logits_keep_mode
from orpo.train.objective import MetricSums, Objective, ORPOObjective


@torch.no_grad()
def evaluate(model, dataset, layout: Layout | int, batch_size: int, objective: Objective = ORPOObjective(),
             accelerator=None, device: torch.device | str | None = None,
             keep_mode: str | None | bool = True) -> dict[str, float]:
    """An objective's metrics over every pair of ``dataset``, token/pair weighted (not a mean of batch means).

    Returns ``loss``, the objective's terms (ORPO: ``nll_loss, or_loss``), its per-pair means (every
    objective: ``logps_chosen, logps_rejected, accuracy, margin``; ORPO adds ``log_odds_ratio``) and
    the counts ``pairs, nll_tokens, tokens``. ``objective``: ORPO with λ = 0.1 unless given.
    With an ``accelerator`` of several processes, batch ``k`` runs on rank ``k mod world`` and the
    sums are all-reduced, so every rank returns the same numbers.
    ``keep_mode``: True = skip the LM head where there is no target when the model allows it.
    ``layout``: a batch layout, or the pad token id for the default ``PaddedLayout``.
    The model is put in eval mode (no dropout) and restored to its previous mode.
    """
    if isinstance(layout, int):
        layout = PaddedLayout(pad_token_id=layout)
    if keep_mode is True:
        keep_mode = logits_keep_mode(_unwrap(model, accelerator))
    elif keep_mode is False:
        keep_mode = None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if device is None:
        device = accelerator.device if accelerator else next(model.parameters()).device
    sums = MetricSums(objective, device)
    was_training = model.training
    model.eval()
    starts = list(range(0, len(dataset), batch_size))
    try:
        # Every rank runs the same number of forwards: a sharded model (FSDP2, ZeRO-3) gathers its
        # weights collectively in each one. A rank without a batch of its own in the last round
        # repeats its first batch and discards the result.
        for k in range(rank, world * math.ceil(len(starts) / world), world):
            start = starts[k] if k < len(starts) else starts[rank % len(starts)]
            rows = dataset[start : start + batch_size]
            rows = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
            batch = objective.prepare(layout(rows), keep_mode)
            nll_tokens, tokens = objective.nll_tokens(batch), batch.num_tokens()
            out = objective(model, batch.to(device))
            if k < len(starts):
                sums.add(out, nll_tokens=nll_tokens, tokens=tokens)
    finally:
        model.train(was_training)
    sums.reduce(accelerator)
    return sums.finalize()


@torch.no_grad()
def pair_logps(model, dataset, layout: Layout | int, batch_size: int, device: torch.device | str | None = None,
               keep_mode: str | None | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, in ``dataset`` order: the length-averaged response log-probs of chosen and rejected.

    The same forward and the same per-sequence averaging as the loss (``forward.token_logps``,
    ``loss.sequence_logps``), kept per pair instead of summed, for ``orpo audit``'s label-noise
    candidates. Float32 CPU tensors of shape ``[len(dataset)]``.
    """
    objective = ORPOObjective()
    if isinstance(layout, int):
        layout = PaddedLayout(pad_token_id=layout)
    if keep_mode is True:
        keep_mode = logits_keep_mode(model)
    elif keep_mode is False:
        keep_mode = None
    device = device or next(model.parameters()).device
    chosen, rejected = torch.zeros(len(dataset)), torch.zeros(len(dataset))
    lengths = pair_tokens(dataset) if len(dataset) else []
    # Longest pairs first: each batch pads only to its own longest pair (not to a random long one
    # in file order), and a batch too large for the device fails at once, not at the end.
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            rows = dataset[index]
            rows = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
            batch = objective.prepare(layout(rows), keep_mode).to(device)
            sums, counts = sequence_logps(token_logps(model, batch), batch.segment_ids, batch.response_mask,
                                          2 * batch.num_pairs)
            logps = (sums / counts.clamp(min=1.0)).float().cpu()
            chosen[index], rejected[index] = logps[: batch.num_pairs], logps[batch.num_pairs :]
    finally:
        model.train(was_training)
    return chosen, rejected


def _unwrap(model, accelerator):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def load_for_inference(name_or_path: str, dtype: str = "auto", device: str | None = None,
                       trust_remote_code: bool = False, key: str = "--model", revision: str | None = None,
                       flags: bool = False) -> tuple[Any, Any]:
    """A trained model folder (full, or a LoRA adapter with its base) and its tokenizer, ready to run.

    The tokenizer comes from the same folder (``final/`` holds it, chat template included) and gets
    a pad token like in training. Placed on CUDA when there is one, in eval mode. ``key`` is how a
    failure names the model (the CLI's flag); it is raised as one-line ``ModelLoadError``.
    ``revision``: of a hub model, or of an adapter's hub base; ``flags``: the messages name the CLI's
    ``--dtype`` / ``--revision`` / ``--trust-remote-code``.
    """
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo.loading import (
        adapter_base,
        check_revision,
        cli_source,
        load,
        load_adapter,
        local_path,
        looks_local,
    )
    from orpo.train.model import DTYPES

    source = cli_source(name_or_path, key, "model or adapter", revision=revision, flags=flags)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    if looks_local(name_or_path) and (Path(local_path(name_or_path)) / "adapter_config.json").is_file():
        base = adapter_base(source)
        if revision is not None:
            base = replace(base, revision=revision)
            check_revision(base)
        model = load_adapter(name_or_path, base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        check_revision(source)
        model = load(AutoModelForCausalLM.from_pretrained, source, dtype=torch_dtype,
                     trust_remote_code=trust_remote_code)
    tokenizer = load(AutoTokenizer.from_pretrained, replace(source, want="tokenizer"),
                     trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def print_eval_table(rows: list[dict[str, Any]], title: str = "evaluation", console: Console | None = None) -> None:
    """One row per model, one column per metric (on stdout by default; ``orpo eval --json`` prints JSON instead)."""
    table = Table(title=title)
    keys = list(rows[0]) if rows else []
    for key in keys:
        table.add_column(key, justify="left" if key == "model" else "right", overflow="fold")
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in (row.get(k) for k in keys)))
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: rich would squeeze the columns into 80 characters
            console = Console(width=250)
    console.print(table)
