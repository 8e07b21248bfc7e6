"""Batch layouts: how tokenized pairs become one forward input.

A layout turns a list of tokenized rows (``chosen_input_ids``, ``chosen_prompt_len``,
``rejected_input_ids``, ``rejected_prompt_len``) into a ``PreferenceBatch``. The loss never sees
the layout: it only needs, for every position of the model's output, the target token, the
sequence that target belongs to and whether it is a response token. So each layout is one class
here, with no change to the loss or the training loop:

    padded                2B right-padded rows (chosen, then rejected): every model, every backend
    packed                the 2B sequences packed into rows of at most ``max_length`` tokens, no padding
                          inside a row; each sequence has its own positions and sees only itself
    shared_prompt         one row per pair, ``[prompt][chosen][rejected]``: the prompt is computed once
    packed_shared_prompt  those prompt-shared pairs, packed into rows of ``max_length`` tokens

The layouts other than ``padded`` say who attends to whom with an ``AttentionRule`` and hand it to
the model in the form its attention backend reads (``attention_inputs``): a 4D bool mask (sdpa),
an additive float mask (eager), a FlexAttention ``BlockMask`` (flex_attention), or, for packed
sequences under FlashAttention, one row with ``cu_seq_lens`` (the varlen kernel; no mask at all).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from orpo.config import ConfigError
from orpo.loss import nll_target_mask

IGNORE_INDEX = -100

LAYOUTS = ("padded", "packed", "shared_prompt", "packed_shared_prompt")
# data.layout auto tries these in order, fastest first (bench/README.md has the measurements)
AUTO_LAYOUTS = ("packed_shared_prompt", "packed", "padded")
# The columns a layout turns into tokens; any other column of a row is a per-pair value (``pair_values``).
TOKEN_COLUMNS = ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")


@dataclass
class PreferenceBatch:
    """One forward input for ``num_pairs`` pairs, chosen and rejected together.

    ``labels[n, t]`` is the token that position ``t`` of row ``n`` must predict (already shifted),
    −100 where there is none. ``segment_ids[n, t]`` is the sequence that target belongs to: chosen
    of pair ``i`` → ``i``, rejected of pair ``i`` → ``num_pairs + i``, −1 for none.
    ``response_mask[n, t]`` marks targets that are response tokens (prompt targets are False).
    ``real_tokens``: the pairs' tokens, chosen + rejected counted as separate sequences, so the same
    number in every layout (a shared prompt is computed once but counts twice): tokens/s then
    compares layouts by the work done, and no layout needs an ``attention_mask`` to count.
    ``pair_values[name][i]``: a number of pair ``i`` that rides along from its row (e.g. DPO's
    reference log-probs), filled by ``pair_values(rows)``.
    """

    inputs: dict[str, Any]
    labels: torch.Tensor
    segment_ids: torch.Tensor
    response_mask: torch.Tensor
    num_pairs: int
    real_tokens: int
    pair_values: dict[str, torch.Tensor] = field(default_factory=dict)
    # Built on the CPU by ``forward.keep_targets``, so the device never computes them (a sync each):
    # the flat indices of ``labels != -100`` and the NLL's token count.
    targets: torch.Tensor | None = None
    nll_tokens: int | None = None
    # ``targets`` are ordered pair by pair, ``pair_rows[i]`` of them pair i's: the chunked head's
    # chunks of whole pairs are row ranges of them, known on the CPU (Python ints stay there).
    pair_rows: tuple[int, ...] | None = None

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """The batch on ``device``: copies that do not block the host (from pinned memory, see the DataLoader)."""
        return replace(
            self,
            inputs={k: _move(v, device) for k, v in self.inputs.items()},
            labels=self.labels.to(device, non_blocking=True),
            segment_ids=self.segment_ids.to(device, non_blocking=True),
            response_mask=self.response_mask.to(device, non_blocking=True),
            pair_values={k: v.to(device, non_blocking=True) for k, v in self.pair_values.items()},
            targets=None if self.targets is None else self.targets.to(device, non_blocking=True),
        )

    def pin_memory(self) -> PreferenceBatch:
        """Page-locked CPU tensors (the DataLoader's ``pin_memory`` calls this), so ``to`` does not block."""
        return replace(
            self,
            inputs={k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()},
            labels=self.labels.pin_memory(),
            segment_ids=self.segment_ids.pin_memory(),
            response_mask=self.response_mask.pin_memory(),
            pair_values={k: v.pin_memory() for k, v in self.pair_values.items()},
            targets=None if self.targets is None else self.targets.pin_memory(),
        )

    def num_nll_tokens(self, nll_on_prompt: bool = False) -> int:
        """Targets the NLL averages over (chosen response, plus chosen prompt if asked); call on the CPU batch."""
        return int(nll_target_mask(self.segment_ids, self.response_mask, self.num_pairs, nll_on_prompt).sum())

    def num_tokens(self) -> int:
        """Real (non-pad) tokens of the pairs, for throughput (see ``real_tokens``)."""
        return self.real_tokens

    def num_positions(self) -> int:
        """Positions the model computes, padding included: what the forward costs."""
        return self.inputs["input_ids"].numel()


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if hasattr(value, "mask_mod"):  # a FlexAttention BlockMask: its mask_mod reads tensors that move too
        moved = value.to(device)
        moved.mask_mod = value.mask_mod.to(device)
        return moved
    return value  # ints (max_length_q / max_length_k)


def pair_values(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every column of the rows besides ``TOKEN_COLUMNS``, as one float32 value per pair in row order.

    Every layout calls this, so a per-pair number added to the dataset (a column) reaches the
    objective without the layout knowing it; a layout that reorders pairs passes its rows in pair order.
    """
    if not rows:
        return {}
    names = [k for k in rows[0] if k not in TOKEN_COLUMNS]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in names}


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
            real_tokens=int(attention_mask.sum()),
            pair_values=pair_values(rows),
        )


# ---------------------------------------------------------------------------------------------
# Items: what the padding-free layouts place in rows


@dataclass
class _Item:
    """A run of tokens that attend only among themselves: one sequence, or one prompt-shared pair.

    Per token: ``ids``, ``pos`` (position id), ``branch`` (0 plain/shared prefix, 1 chosen branch,
    2 rejected branch) and the target of that position (``labels``, ``segment``, ``response``).
    """

    ids: torch.Tensor
    pos: torch.Tensor
    branch: torch.Tensor
    labels: torch.Tensor
    segment: torch.Tensor
    response: torch.Tensor

    def __len__(self) -> int:
        return self.ids.numel()

    def __getitem__(self, s: slice) -> _Item:
        return _Item(*(getattr(self, f)[s] for f in _ITEM_FIELDS))

    def on_branch(self, branch: int) -> _Item:
        return replace(self, branch=torch.full_like(self.branch, branch))


_ITEM_FIELDS = ("ids", "pos", "branch", "labels", "segment", "response")


def _sequence(seq: Sequence[int], prompt_len: int, segment: int) -> _Item:
    """One sequence as the padded layout lays it out: position j predicts token j+1."""
    ids = torch.as_tensor(seq, dtype=torch.long)
    n = ids.numel()
    labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
    labels[:-1] = ids[1:]
    seg = torch.full((n,), segment, dtype=torch.long)
    seg[-1] = -1
    response = torch.zeros(n, dtype=torch.bool)
    response[max(prompt_len - 1, 0) : n - 1] = True
    return _Item(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), labels, seg, response)


def _concat(items: Sequence[_Item]) -> _Item:
    return _Item(*(torch.cat([getattr(it, f) for it in items]) for f in _ITEM_FIELDS))


def separate_items(rows: Sequence[dict[str, Any]]) -> list[_Item]:
    """Each chosen and each rejected sequence on its own (chosen of pair i -> segment i, rejected -> B + i)."""
    b = len(rows)
    return ([_sequence(r["chosen_input_ids"], r["chosen_prompt_len"], i) for i, r in enumerate(rows)]
            + [_sequence(r["rejected_input_ids"], r["rejected_prompt_len"], b + i) for i, r in enumerate(rows)])


def shared_prefix_len(row: dict[str, Any]) -> int:
    """Tokens a pair's chosen and rejected sequences share in the shared-prompt layout (see ``shared_items``)."""
    c = torch.as_tensor(row["chosen_input_ids"])
    r = torch.as_tensor(row["rejected_input_ids"])
    m = min(c.numel(), r.numel(), row["chosen_prompt_len"], row["rejected_prompt_len"])
    common = int(torch.cumprod(c[:m] == r[:m], 0).sum())
    return max(common - 1, 0)


def shared_items(rows: Sequence[dict[str, Any]]) -> list[_Item]:
    """One item per pair: ``[prefix][last prefix token + chosen][last prefix token + rejected]``.

    The last prompt position predicts the first token of *both* responses: one position, two
    targets. Rather than give a position a second label (which every consumer of ``labels`` would
    have to know about), the prompt's last token is computed twice, once at the head of each
    branch, at the same position id and seeing the same prefix, so its hidden state is the same
    and each copy carries one target. The price is one position per pair; the loss, ``keep_targets``
    and every log-prob path stay as they are. The prefix is the prompt both sequences start with
    (tokens, not text: a BPE merge at the boundary can make the two prompts differ by a token),
    and its targets belong to the chosen sequence, which is where the padded layout's NLL reads
    prompt targets (``nll_on_prompt``); the rejected prompt's targets are never read.
    """
    b = len(rows)
    items = []
    for i, row in enumerate(rows):
        k = shared_prefix_len(row)
        chosen = _sequence(row["chosen_input_ids"], row["chosen_prompt_len"], i)
        rejected = _sequence(row["rejected_input_ids"], row["rejected_prompt_len"], b + i)
        items.append(_concat([chosen[:k], chosen[k:].on_branch(1), rejected[k:].on_branch(2)]))
    return items


def pair_tokens(dataset) -> list[int]:
    """chosen + rejected tokens of each row of a tokenized ``datasets.Dataset``, read column-wise:
    what batching by length (``train.max_tokens_per_batch``, ``orpo audit --model``) sorts on."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    return pc.add(pc.list_value_length(table["chosen_input_ids"]),
                  pc.list_value_length(table["rejected_input_ids"])).to_pylist()


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Item indices per row: longest first, each into the first row with room (a longer one alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


# ---------------------------------------------------------------------------------------------
# Attention


@dataclass(eq=False)
class AttentionRule:
    """Who attends to whom, the same rule for every padding-free layout and backend.

    Query ``q`` sees key ``k`` (both in row ``b``) when they belong to the same item (``doc``), ``k``
    is not later (by position id) and ``k`` is shared (branch 0) or on ``q``'s own branch; so
    packed sequences never see each other and a rejected response never sees the chosen one.
    Padding has ``doc == -1`` and sees only padding (a query that sees nothing would give NaN).
    All three are ``[R, T]`` (rows, row length). Callable as a FlexAttention ``mask_mod``.
    """

    doc: torch.Tensor
    branch: torch.Tensor
    pos: torch.Tensor

    def __call__(self, b, h, q, kv):
        same_doc = self.doc[b, q] == self.doc[b, kv]
        causal = self.pos[b, kv] <= self.pos[b, q]
        branch_ok = (self.branch[b, kv] == 0) | (self.branch[b, kv] == self.branch[b, q])
        return same_doc & causal & branch_ok

    def dense(self) -> torch.Tensor:
        """``[R, 1, T, T]`` bool, True = attend (R·T² bytes: what the 4D-mask backends read)."""
        d, br, p = self.doc, self.branch, self.pos
        same_doc = d[:, :, None] == d[:, None, :]
        causal = p[:, None, :] <= p[:, :, None]
        branch_ok = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
        return (same_doc & causal & branch_ok).unsqueeze(1)

    def to(self, device: torch.device | str) -> AttentionRule:
        return AttentionRule(self.doc.to(device), self.branch.to(device), self.pos.to(device))


def mask_style(attn_implementation: str | None) -> str:
    """How a backend takes a padding-free batch: ``bool`` | ``additive`` | ``block`` | ``varlen``.

    sdpa reads a 4D bool mask; eager *adds* the mask to the scores (a bool mask there would add 0/1
    and mask nothing, so it gets 0/−inf); flex_attention adds a tensor mask too but reads a
    ``BlockMask`` natively (and skips the blocks it masks); FlashAttention takes no mask: packed
    sequences go in one row with ``cu_seq_lens`` (its varlen kernel).
    """
    name = attn_implementation or "sdpa"
    if name == "sdpa":
        return "bool"
    if name == "eager":
        return "additive"
    if name == "flex_attention":
        return "block"
    if "flash" in name and "paged" not in name:
        return "varlen"
    raise ConfigError(f"attention implementation {name!r} has no padding-free path: use data.layout: padded, "
                     "or attn_implementation sdpa | eager | flex_attention | flash_attention_2")


@dataclass
class _RowsLayout:
    """The padding-free layouts' shared half: place items in rows, say who attends to whom.

    ``max_length``: the tokens of a row (a longer item gets a row of its own); ``None`` = one item
    per row. ``attn_implementation``: the model's attention backend (``mask_style``); ``dtype``:
    the model's, for eager's additive mask. ``device``: where a FlexAttention ``BlockMask`` is built,
    the model's (``on_device``): on the CPU it costs ~0.6 s per 4x2048 micro-batch, on a GPU ~nothing.
    """

    pad_token_id: int
    max_length: int | None = None
    attn_implementation: str | None = "sdpa"
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    style: str = field(init=False)

    def __post_init__(self) -> None:
        self.style = mask_style(self.attn_implementation)

    def items(self, rows: Sequence[dict[str, Any]]) -> list[_Item]:
        raise NotImplementedError

    def __call__(self, rows: Sequence[dict[str, Any]]) -> PreferenceBatch:
        items = self.items(rows)
        lengths = [len(it) for it in items]
        if self.style == "varlen":
            placement = [list(range(len(items)))]  # one row, no padding: cu_seq_lens separates the sequences
        elif self.max_length is None:
            placement = [[i] for i in range(len(items))]
        else:
            placement = first_fit_decreasing(lengths, max(self.max_length, max(lengths)))
        t = max(sum(lengths[i] for i in row) for row in placement)
        n = len(placement)
        ids = torch.full((n, t), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((n, t), dtype=torch.long)
        doc = torch.full((n, t), -1, dtype=torch.long)
        branch = torch.zeros((n, t), dtype=torch.long)
        labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.full((n, t), -1, dtype=torch.long)
        response_mask = torch.zeros((n, t), dtype=torch.bool)
        for r, row in enumerate(placement):
            at = 0
            for i in row:
                it, end = items[i], at + lengths[i]
                ids[r, at:end], pos[r, at:end], branch[r, at:end], doc[r, at:end] = it.ids, it.pos, it.branch, i
                labels[r, at:end], segment_ids[r, at:end], response_mask[r, at:end] = it.labels, it.segment, it.response
                at = end
        inputs = {"input_ids": ids, "position_ids": pos}
        inputs.update(self.attention_inputs(AttentionRule(doc, branch, pos), [lengths[i] for i in placement[0]]))
        real = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
        return PreferenceBatch(inputs=inputs, labels=labels, segment_ids=segment_ids, response_mask=response_mask,
                               num_pairs=len(rows), real_tokens=real, pair_values=pair_values(rows))

    def attention_inputs(self, rule: AttentionRule, varlen_lengths: list[int]) -> dict[str, Any]:
        """The rule in the form ``self.style`` reads (``varlen_lengths``: the one row's sequences)."""
        if self.style == "varlen":
            if bool((rule.branch != 0).any()):
                raise ConfigError("FlashAttention's varlen kernel cannot share a prompt between two branches; "
                                 "use data.layout: packed, or attn_implementation sdpa | eager | flex_attention")
            cu = torch.tensor([0, *varlen_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            longest = max(varlen_lengths)
            return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        if self.style == "block":
            from torch.nn.attention.flex_attention import create_block_mask

            n, t = rule.doc.shape
            rule = rule.to(self.device)
            return {"attention_mask": create_block_mask(rule, n, None, t, t, device=self.device)}
        allowed = rule.dense()
        if self.style == "additive":
            mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
            return {"attention_mask": mask}
        return {"attention_mask": allowed}


@dataclass
class PackedLayout(_RowsLayout):
    """Padding-free packing: the 2B sequences in rows of at most ``max_length`` tokens (first-fit
    decreasing), each with position ids from 0 and attention only within itself.

    Computes ~no padding (only the gap at the end of each row; none under FlashAttention, which
    takes the whole micro-batch as one row). With a 4D mask (sdpa, eager) a row's attention still
    costs T² over the whole row; FlexAttention skips the masked blocks, FlashAttention never sees them.
    """

    def items(self, rows: Sequence[dict[str, Any]]) -> list[_Item]:
        return separate_items(rows)


@dataclass
class SharedPromptLayout(_RowsLayout):
    """One row per pair, ``[prompt][chosen][rejected]``, the prompt computed once (see ``shared_items``).

    Saves the prompt's tokens once per pair (most of an HH pair), but pads rows to the longest pair;
    needs a mask (sdpa, eager, flex_attention), not FlashAttention. ``max_length`` set: see
    ``PackedSharedPromptLayout``.
    """

    def items(self, rows: Sequence[dict[str, Any]]) -> list[_Item]:
        return shared_items(rows)


@dataclass
class PackedSharedPromptLayout(SharedPromptLayout):
    """Prompt-shared pairs packed into rows of ``max_length`` tokens (a longer pair gets its own row):
    the fewest positions of all layouts; needs a mask (sdpa, eager, flex_attention)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is None:
            raise ConfigError("PackedSharedPromptLayout needs max_length (the tokens of a row)")


def build_layout(name: str, pad_token_id: int, max_length: int, attn_implementation: str | None = "sdpa",
                 dtype: torch.dtype = torch.float32) -> Layout:
    """The layout ``data.layout`` names, for a model with this attention backend and dtype."""
    if name == "padded":
        return PaddedLayout(pad_token_id=pad_token_id)
    if name == "packed":
        return PackedLayout(pad_token_id, max_length, attn_implementation, dtype)
    if name == "shared_prompt":
        layout: Layout = SharedPromptLayout(pad_token_id, None, attn_implementation, dtype)
    elif name == "packed_shared_prompt":
        layout = PackedSharedPromptLayout(pad_token_id, max_length, attn_implementation, dtype)
    else:
        raise ConfigError(f"unknown layout {name!r}; one of {', '.join(LAYOUTS)}")
    if mask_style(attn_implementation) == "varlen":
        raise ConfigError(f"data.layout {name} needs an attention mask, which FlashAttention does not take: "
                         "use attn_implementation sdpa | eager | flex_attention, or data.layout: packed")
    return layout


def on_device(layout: Layout, device: torch.device | str) -> Layout:
    """``layout`` building its FlexAttention ``BlockMask``s on ``device`` (the model's); other layouts as they are.

    Only for a collate function that runs in the main process: a DataLoader worker cannot use CUDA.
    """
    if isinstance(layout, _RowsLayout) and layout.style == "block":
        return replace(layout, device=device)
    return layout


def attention_span(config) -> tuple[str, int] | None:
    """The span some layer of this model attends within, a sliding window or chunked attention (Llama-4),
    or None. Read from the text config: multimodal models (Gemma-3 4B and up, Llama-4) keep it in
    ``text_config``, and ``layer_types`` says whether any layer uses it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ())
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) and (not types or "sliding_attention" in types):
        return "a sliding window", int(window)
    chunk = getattr(text, "attention_chunk_size", None)
    if chunk and (not types or "chunked_attention" in types):
        return "chunked attention", int(chunk)
    return None


def layout_for_model(name: str, model, pad_token_id: int, max_length: int) -> Layout:
    """``build_layout`` for this model's attention backend and dtype, refusing models it would get wrong.

    The padding-free layouts give the model its position ids and, except under FlashAttention, a
    4D mask that replaces the one transformers would build: a model whose forward takes no
    ``position_ids`` (ALiBi models such as Bloom) or that needs a sliding window shorter than a row
    (the custom mask has none) is refused with a clear message rather than trained wrongly.
    """
    if name == "padded":
        return PaddedLayout(pad_token_id=pad_token_id)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        raise ConfigError(f"data.layout {name}: {type(inner).__name__} takes no position_ids, so packed "
                          "sequences cannot restart their positions; use data.layout: padded")
    impl = getattr(config, "_attn_implementation", None)
    row = max_length if name == "packed" else 2 * max_length
    limit = attention_span(config)
    # FlashAttention's varlen kernel applies a sliding window itself; no backend applies chunked attention
    if limit is not None and limit[1] < row and (limit[0] == "chunked attention" or mask_style(impl) != "varlen"):
        kind, span = limit
        raise ConfigError(f"data.layout {name}: this model attends within {kind} of {span} tokens, "
                          f"which a custom mask does not apply, and a row can hold {row}; use data.layout: padded"
                          + (" or attn_implementation flash_attention_2" if kind == "a sliding window" else ""))
    return build_layout(name, pad_token_id, max_length, impl, inner.dtype)


def resolve_layout(name: str, model, pad_token_id: int, max_length: int) -> tuple[Layout, str]:
    """The layout ``data.layout`` asks for and a line saying which one runs; ``auto`` takes the first
    of ``AUTO_LAYOUTS`` this model and attention backend can run exactly, and says why it skipped any."""
    if name != "auto":
        return layout_for_model(name, model, pad_token_id, max_length), f"layout: {name}"
    skipped = []
    for candidate in AUTO_LAYOUTS:
        try:
            layout = layout_for_model(candidate, model, pad_token_id, max_length)
        except ConfigError as err:
            why = re.split(r"[;:] use ", re.sub(r"^data\.layout \S+:? ", "", str(err)))[0]
            skipped.append(f"not {candidate}: {why}")
            continue
        return layout, f"layout: {candidate} (data.layout auto{'; ' + '; '.join(skipped) if skipped else ''})"
    raise AssertionError("padded takes every model")
