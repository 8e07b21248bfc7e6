"""How the model runs over a ``PreferenceBatch``: the one place where a training forward happens.

Objectives never call the model themselves. They say which targets they read (``keep_targets``,
on the CPU in the collate function) and get per-target token log-probs (``token_logps``) or their
loss (``pair_loss``) back, so a faster way to compute those serves every objective, and the
objectives stay small math. Two such ways, both exact:

- ``logits_to_keep``: the LM head runs only where a target is read (``keep_targets``).
- the chunked head (``configure_logps``, ``train.logps``): the model's own LM head computes
  nothing; its input, the final hidden states of the read positions, is taken by a forward
  pre-hook on the head and turned into log-probs a chunk of rows at a time, so no
  ``[targets, vocab]`` logits tensor exists, forward or backward. In training, ``pair_loss`` hands
  ``chunked.chunked_loss`` chunks of whole pairs and the objective's per-pair loss, and each
  chunk's gradient is computed while its logits exist (3 head matmuls, none recomputed); without
  a gradient (evaluation) it is ``chunked.chunked_token_logps``'s forward only.

The hook is the seam that keeps the forward going through the (DDP-wrapped) model's own
``forward``, which gradient synchronization relies on: the decoder, ``logits_to_keep`` and the
wrapper all run as usual, and the head sees an empty input instead of ``[rows, hidden]``.
Which rows make a chunk is decided from CPU data: ``keep_targets`` orders the targets pair by
pair and counts each pair's (``PreferenceBatch.pair_rows``), so the step asks the device nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from orpo.data.collate import IGNORE_INDEX, PreferenceBatch
from orpo.loss import PairLogps, pair_logps, token_logps_from_logits
from orpo.train.chunked import LogitTransform, chunked_loss, chunked_token_logps, compute_dtype

LOGPS_MODES = ("auto", "chunked", "full")
_PLAN_ATTR = "_orpo_logps_plan"


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
    # nonzero here, on the CPU: on the device it would wait for the GPU once per micro-batch
    targets = (labels.reshape(-1) != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    # pair by pair (chosen and rejected of pair i are i and B + i), so chunks of whole pairs are row ranges
    seg = segment_ids.reshape(-1)[targets].long()
    pair = torch.where(seg >= batch.num_pairs, seg - batch.num_pairs, seg)
    order = torch.sort(pair, stable=True).indices
    # a target of no sequence (a hand-made ``read``) belongs to no pair: no chunk plan then
    pair_rows = tuple(torch.bincount(pair, minlength=batch.num_pairs).tolist()) if bool((seg >= 0).all()) else None
    return replace(batch, inputs=inputs, labels=labels, segment_ids=segment_ids, response_mask=response_mask,
                   targets=targets[order], pair_rows=pair_rows)


def token_logps(model, batch: PreferenceBatch) -> torch.Tensor:
    """log P(target) at every position of ``batch.labels`` (float32; 0 where there is no target).

    Chunked when ``configure_logps`` chose it for this model, else from the model's logits.
    """
    plan = logps_plan(model)
    if plan is None or not plan.chunked:
        logits = model(**batch.inputs, use_cache=False).logits
        return token_logps_from_logits(logits, batch.labels, batch.targets)
    head, rows, targets, keep, dtype = _head_rows(model, batch)
    picked = chunked_token_logps(rows, head.weight, head.bias, targets, plan.transform, plan.chunk_size, dtype)
    return _scatter(picked, keep, batch.labels.shape)


# The loss of some pairs from their ``PairLogps`` and per-pair values (the batch's ``pair_values``, sliced).
PairLoss = Callable[[PairLogps, dict[str, torch.Tensor]], torch.Tensor]


def pair_loss(model, batch: PreferenceBatch, loss_of: PairLoss, nll_on_prompt: bool = False
              ) -> tuple[torch.Tensor, PairLogps]:
    """``loss_of`` the batch's pairs (with its gradient) and the batch's ``PairLogps`` (for the metrics).

    ``loss_of`` must be a sum over pairs (its normalizers global, not of the pairs it is given):
    on the chunked path with a gradient to compute it runs once per chunk of whole pairs inside
    ``chunked.chunked_loss``, and the chunks' losses add up to the batch's. Elsewhere (full
    logits, or no gradient) it runs once on the whole batch; the ``PairLogps`` then carry the
    gradient too.
    """
    plan = logps_plan(model)
    if plan is None or not plan.chunked or not torch.is_grad_enabled() or batch.pair_rows is None:
        lp = pair_logps(token_logps(model, batch), batch.segment_ids, batch.response_mask, batch.num_pairs,
                        nll_on_prompt)
        return loss_of(lp, batch.pair_values), lp
    head, rows, targets, keep, dtype = _head_rows(model, batch)
    chunks = pair_chunks(batch.pair_rows, plan.chunk_size)
    seg = batch.segment_ids.reshape(-1).index_select(0, keep).long()
    response = batch.response_mask.reshape(-1).index_select(0, keep)
    b = batch.num_pairs

    def chunk_loss(k: int, logps: torch.Tensor) -> torch.Tensor:
        p0, p1, s, e = chunks[k]
        n, sk = p1 - p0, seg[s:e]
        # the chunk's own sequence ids: chosen of its pair j -> j, rejected -> n + j
        local = torch.where(sk >= b, sk - b + n, sk) - p0
        lp = pair_logps(logps, local, response[s:e], n, nll_on_prompt)
        return loss_of(lp, {name: v[p0:p1] for name, v in batch.pair_values.items()})

    bounds = [c[2] for c in chunks] + [rows.shape[0]]
    loss, picked = chunked_loss(rows, head.weight, head.bias, targets, bounds, chunk_loss, plan.transform, dtype,
                                max_rows=plan.chunk_size)
    token = _scatter(picked, keep, batch.labels.shape)
    return loss, pair_logps(token, batch.segment_ids, batch.response_mask, batch.num_pairs, nll_on_prompt)


def pair_chunks(pair_rows: tuple[int, ...], chunk_size: int) -> list[tuple[int, int, int, int]]:
    """``(first pair, end pair, first row, end row)`` of each chunk: whole pairs, up to ``chunk_size`` rows.

    Greedy in pair order (the rows are ordered so by ``keep_targets``); a pair of more rows than
    ``chunk_size`` is a chunk on its own. Plain Python on the batch's CPU counts: no device sync.
    """
    chunks: list[tuple[int, int, int, int]] = []
    p0 = s = rows = 0
    for p, n in enumerate(pair_rows):
        if p > p0 and rows + n > chunk_size:
            chunks.append((p0, p, s, s + rows))
            p0, s, rows = p, s + rows, 0
        rows += n
    if pair_rows:
        chunks.append((p0, len(pair_rows), s, s + rows))
    return chunks


def _head_rows(model, batch: PreferenceBatch) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.dtype]:
    """Forward with the LM head skipped: the head, the final hidden states of the targets, the
    targets, their flat indices (``batch.targets``' order) and the dtype the head computes in."""
    with HeadCapture(_head_linears(_inner(model)), skip_head=True) as cap:
        model(**batch.inputs, use_cache=False)
    head, hidden, dtype = cap.single()
    flat = batch.labels.reshape(-1)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.shape[0] != flat.numel():
        raise RuntimeError(f"the LM head saw {rows.shape[0]} positions but the batch has {flat.numel()} targets")
    keep = batch.targets if batch.targets is not None else (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return head, rows.index_select(0, keep), flat.index_select(0, keep), keep, dtype


def _scatter(picked: torch.Tensor, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-target log-probs back at their positions (0 where there is no target)."""
    out = torch.zeros(shape.numel(), dtype=torch.float32, device=picked.device)
    return out.index_put((keep,), picked).view(shape)


# ---------------------------------------------------------------------------------------------
# Choosing the path, once per model


@dataclass(frozen=True)
class LogpsPlan:
    """How ``token_logps`` computes log-probs for one model (``configure_logps`` attaches it)."""

    chunked: bool
    chunk_size: int = 0  # rows per chunk (chunked only)
    transform: LogitTransform = LogitTransform()
    note: str | None = None  # why the plain path runs although chunked was possible to ask for

    def describe(self) -> str:
        if self.chunked:
            return f"log-probs: chunked, {self.chunk_size} rows per chunk, no [targets, vocab] logits"
        return self.note or "log-probs: from the model's full logits (train.logps: full)"


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: float32 ``[rows, vocab]`` logits of ~64 MiB on a CPU, ~512 MiB on a GPU.

    A multiple of 64, at least 64: big enough that the chunk's matmuls run at full speed (a GPU
    wants more rows per launch), small next to the model and its optimizer state. bench/chunk_size.py
    sweeps it (a chunk holds whole pairs, so one can be larger: a pair longer than it).
    """
    budget = 2**27 if torch.device(device).type == "cuda" else 2**24
    return max(64, (budget // max(vocab_size, 1)) // 64 * 64)


def configure_logps(model, mode: str = "auto", chunk_size: int | None = None, engine: str = "single",
                    device: torch.device | str | None = None) -> LogpsPlan:
    """Choose how ``token_logps`` runs ``model`` and attach the choice to it (call before wrapping).

    ``auto``: chunked where the model allows it, else the full logits with a one-line note;
    ``chunked``: the same but an error where it cannot; ``full``: always the model's own logits.
    A model allows it when its LM head is a plain ``nn.Linear`` (also inside PEFT's
    ``modules_to_save``), and a probe forward on four tokens shows that the model's logits are
    that linear layer's output after the scale/soft-cap ``LogitTransform`` read from its config,
    so a model that does something else to its logits is caught here, not trained wrongly.
    ``engine``: under ZeRO-3 the head's weight exists only during its own forward (DeepSpeed frees
    a partitioned parameter after it), and the chunked path reads it after the forward and in
    backward: full logits there. ``device``: where the model will run (a sharding engine moves
    it there only later), which sets the default chunk size.
    """
    from orpo.config import ConfigError

    if mode not in LOGPS_MODES:
        raise ConfigError(f"train.logps must be one of {', '.join(LOGPS_MODES)}, got {mode!r}")
    plan = LogpsPlan(chunked=False)
    if mode != "full":
        transform, reason = _check_chunked(model)
        if reason is None and engine == "zero3":
            reason = "ZeRO-3 frees the LM head's weight after its forward, where the chunked head reads it"
        if reason is None:
            head = _head_linears(_inner(model))[0]
            chunk_size = chunk_size or default_chunk_size(head.out_features, device or head.weight.device)
            plan = LogpsPlan(chunked=True, chunk_size=chunk_size, transform=transform)
        elif mode == "chunked":
            raise ConfigError(f"train.logps: chunked is not possible for this model: {reason}")
        else:
            plan = LogpsPlan(chunked=False, note=f"log-probs: from the full logits, since {reason}")
    setattr(model, _PLAN_ATTR, plan)
    return plan


def logps_plan(model) -> LogpsPlan | None:
    """The plan ``configure_logps`` attached to ``model`` (seen through DDP / compile wrappers)."""
    return getattr(_unwrap(model), _PLAN_ATTR, None)


def logit_transform(config) -> LogitTransform:
    """The scale and soft-cap transformers applies after the LM head, from the model's config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


def _check_chunked(model) -> tuple[LogitTransform, str | None]:
    inner = _inner(model)
    try:
        linears = _head_linears(inner)
    except ValueError as e:
        return LogitTransform(), str(e)
    transform = logit_transform(inner.config)
    embed = inner.get_input_embeddings()
    device = embed.weight.device if embed is not None else next(inner.parameters()).device
    ids = torch.arange(1, 5, device=device) % linears[0].out_features
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with HeadCapture(linears, skip_head=False) as cap:
                logits = model(input_ids=ids[None], use_cache=False).logits
            head, hidden, _ = cap.single()
            ours = transform.apply(nn.functional.linear(hidden, head.weight, head.bias).float())
            theirs = logits.float().reshape(ours.shape)
            tol = 1e-5 if logits.dtype == torch.float32 else 2e-2
            if not torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max())):
                return transform, (f"{type(inner).__name__}'s logits are not its LM head's output after "
                                   f"{transform} (a logit transform we do not know)")
            with HeadCapture(linears, skip_head=True) as cap:
                model(input_ids=ids[None], use_cache=False)
            cap.single()
    except (RuntimeError, ValueError, TypeError) as e:
        return transform, f"a probe forward of {type(inner).__name__} with the LM head skipped failed ({e})"
    finally:
        model.train(was_training)
    return transform, None


# ---------------------------------------------------------------------------------------------
# The head and its input


class HeadCapture:
    """Forward pre-hooks on the LM head's linear layer(s): record ``(layer, input, compute dtype)``.

    ``skip_head``: hand the layer an empty input (no rows), so the model's own logits are an empty
    tensor and cost nothing; the recorded input keeps its autograd graph back to the decoder. The
    dtype is the one the layer would have computed in (autocast is on inside a mixed-precision
    model's forward only, so the chunked head must be told).
    """

    def __init__(self, linears: tuple[nn.Linear, ...], skip_head: bool):
        self.linears, self.skip_head = linears, skip_head
        self.calls: list[tuple[nn.Linear, torch.Tensor, torch.dtype]] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.Linear, args: tuple) -> tuple | None:
        x = args[0]
        self.calls.append((module, x, compute_dtype(x.device.type, module.weight.dtype)))
        return (x.narrow(-2, 0, 0), *args[1:]) if self.skip_head else None

    def __enter__(self) -> HeadCapture:
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.linears]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def single(self) -> tuple[nn.Linear, torch.Tensor, torch.dtype]:
        if len(self.calls) != 1:
            raise RuntimeError(f"the LM head ran {len(self.calls)} times in one forward, not once")
        return self.calls[0]


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _head_linears(model) -> tuple[nn.Linear, ...]:
    """The plain linear layer(s) that can compute the logits: the head, or its PEFT ``modules_to_save`` copies."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding layer")
    if _is_plain_linear(head):
        return (head,)
    inner = getattr(head, "modules_to_save", None)  # peft ModulesToSaveWrapper: one of these runs
    if inner is not None and hasattr(head, "original_module"):
        linears = (head.original_module, *inner.values())
        if all(_is_plain_linear(m) for m in linears):
            return linears
    raise ValueError(f"its LM head is a {type(head).__name__}, not a plain nn.Linear "
                     "(LoRA on lm_head: train it in full with lora.modules_to_save instead)")


def _unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _inner(model):
    """The transformers model: under DDP / compile wrappers and PEFT."""
    from orpo.train.model import base_model

    return base_model(_unwrap(model))
