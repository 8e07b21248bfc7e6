"""Tokenize rendered pairs: find the prompt/response boundary, add BOS/EOS once, truncate safely.

Prompt and response are tokenized together, because BPE/SentencePiece merges across the
boundary (a prompt ending mid-word or with a space) must come out as the model will see them at
inference. The boundary is then found on the joint tokens: a token that straddles it counts as
response. BOS is added only when the tokenizer normally adds one and the text does not already
start with it (templates such as llama3 emit it), EOS only when the response does not already
end with it, so neither is ever doubled.

Truncation never leaves a response empty: the prompt is cut from the left to its budget (after
BOS, keeping its end, the generation prompt), then each response is cut from the right to what
is left of ``max_length``; a pair whose response keeps fewer than ``min_response_tokens`` tokens
is dropped with a reason, never kept empty; so is a pair whose two sequences come out as the same
tokens (responses that differ only past the cut, or only in what the template trims). The budget
is ``max_prompt_length`` when set; otherwise it adapts per pair: whatever the longer response
leaves of ``max_length``, but never less than half of it, so neither a long prompt nor a long
response squeezes the other to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orpo.config import DataConfig
from orpo.data.formats import Message, Pair
from orpo.data.templates import ChatTemplate, ChatTemplateError, RenderedPair, render_pair

OUTPUT_COLUMNS = ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")
STAT_COLUMNS = ("prompt_tokens", "chosen_tokens", "rejected_tokens", "truncated", "drop_reason")
PAIR_COLUMNS = ("prompt", "messages", "chosen", "rejected")
CHARS_PER_CALL = 1_000_000  # text per tokenizer call (see encode_rendered)

# drop reasons
RESPONSE_TOO_SHORT = "response_too_short"  # fewer than min_response_tokens even untruncated
NO_ROOM_FOR_RESPONSE = "no_room_for_response"  # the cut prompt leaves < min_response_tokens of max_length
IDENTICAL_TOKENS = "identical_tokens"  # chosen and rejected are the same sequence: no preference to learn


@dataclass(frozen=True)
class Limits:
    """Token limits per sequence (see ``DataConfig``)."""

    max_length: int
    prompt_budget: int | None = None  # None: adaptive, see the module doc
    min_response_tokens: int = 1

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Limits:
        return cls(cfg.max_length, cfg.max_prompt_length, cfg.min_response_tokens)

    def budget_for(self, longest_response: int) -> int:
        """Prompt tokens allowed for a pair whose longer response has ``longest_response`` tokens."""
        if self.prompt_budget is not None:
            return self.prompt_budget
        adaptive = max(self.max_length - longest_response, self.max_length // 2)
        return min(adaptive, self.max_length - self.min_response_tokens)


@dataclass(frozen=True)
class SpecialTokens:
    """What to add at token level: BOS (if the tokenizer normally adds one) and EOS."""

    bos_id: int | None
    bos_text: str  # "" when bos_id is None
    eos_id: int | None
    eos_text: str  # "" when eos_id is None

    @classmethod
    def of(cls, tokenizer) -> SpecialTokens:
        bos_id = tokenizer.bos_token_id
        if bos_id is not None:
            probe = tokenizer("x")["input_ids"]
            if not probe or probe[0] != bos_id:
                bos_id = None  # this tokenizer does not start sequences with BOS (Qwen, GPT-2, ...)
        return cls(
            bos_id=bos_id,
            bos_text=tokenizer.bos_token if bos_id is not None else "",
            eos_id=tokenizer.eos_token_id,
            eos_text=tokenizer.eos_token if tokenizer.eos_token_id is not None else "",
        )


@dataclass
class EncodedPair:
    """One tokenized pair (the columns of the tokenized dataset) plus its statistics."""

    chosen_input_ids: list[int]
    chosen_prompt_len: int
    rejected_input_ids: list[int]
    rejected_prompt_len: int
    prompt_tokens: int  # untruncated prompt length (BOS included; the longer of the two splits)
    chosen_tokens: int  # untruncated response lengths (EOS included)
    rejected_tokens: int
    truncated: bool
    drop_reason: str  # "" when kept

    @property
    def kept(self) -> bool:
        return not self.drop_reason


# ------------------------------------------------------------------------------ sequences


def encode_sequences(
    prompts: Sequence[str], responses: Sequence[str], tokenizer, special: SpecialTokens | None = None
) -> list[tuple[list[int], int]]:
    """Tokenize each ``prompt + response`` in one batch call -> (ids with BOS/EOS, prompt length)."""
    special = special or SpecialTokens.of(tokenizer)
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    backend = _plain_backend(tokenizer)
    if backend is not None:
        # the Rust tokenizer itself: transformers' per-sequence conversion of every token's offsets
        # would cost more than tokenizing; the boundary is read off the one token it needs
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        all_ids = [e.ids for e in encodings]
        bounds = [_boundary(e, len(p)) for e, p in zip(encodings, prompts, strict=True)]
    elif getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        all_ids = enc["input_ids"]
        bounds = [
            _boundary_from_offsets(offsets, len(p))
            for offsets, p in zip(enc["offset_mapping"], prompts, strict=True)
        ]
    else:
        all_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        alone = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
        bounds = [_common_prefix(a, f) for a, f in zip(alone, all_ids, strict=True)]
    out = []
    for ids, bound, prompt, response in zip(all_ids, bounds, prompts, responses, strict=True):
        ids = list(ids)
        if special.bos_id is not None and not prompt.startswith(special.bos_text):
            ids.insert(0, special.bos_id)
            bound += 1
        if special.eos_id is not None and not response.endswith(special.eos_text):
            ids.append(special.eos_id)
        out.append((ids, bound))
    return out


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Prompt ids for generation, with BOS exactly as the training sequences have it."""
    special = SpecialTokens.of(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if special.bos_id is not None and not text.startswith(special.bos_text):
        ids = [special.bos_id, *ids]
    return ids


def _plain_backend(tokenizer):
    """The Rust tokenizer behind a fast ``tokenizer`` when calling it directly gives exactly what
    ``tokenizer(text, add_special_tokens=False)`` gives (no per-call truncation, padding or
    special-token splitting to apply), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if backend.truncation is not None or backend.padding is not None or getattr(tokenizer, "split_special_tokens",
                                                                                  False):
        return None
    return backend


def _boundary(encoding, prompt_chars: int) -> int:
    """``_boundary_from_offsets`` on a Rust encoding, reading one or two tokens' offsets.

    Tokens come in text order, so the first token ending past the prompt is the one holding its
    first response character, provided the token before it ends within the prompt; a character no
    token covers (a normalizer dropped it) or an out-of-order offset reads all offsets instead.
    """
    j = encoding.char_to_token(prompt_chars)
    if j is not None:
        before = encoding.token_to_chars(j - 1) if j > 0 else None
        if j == 0 or (before is not None and before[1] <= prompt_chars):
            return j
    return _boundary_from_offsets(encoding.offsets, prompt_chars)


def _boundary_from_offsets(offsets: Sequence[Sequence[int]], prompt_chars: int) -> int:
    """Index of the first token ending past the prompt: a token straddling the boundary is response."""
    for i, (_, end) in enumerate(offsets):
        if end > prompt_chars:
            return i
    return len(offsets)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------ truncation


def truncate_pair(
    chosen: tuple[list[int], int], rejected: tuple[list[int], int], limits: Limits, bos_id: int | None
) -> EncodedPair:
    """Cut the shared prompt from the left and each response from the right; see the module doc.

    Boundary merges can give chosen and rejected prompt lengths that differ by a token, so the
    cut is sized on the longer one and the same number of leading prompt tokens (the same text)
    is removed from both.
    """
    (c_ids, c_bound), (r_ids, r_bound) = chosen, rejected
    lead = 1 if bos_id is not None and c_ids[:1] == [bos_id] and r_ids[:1] == [bos_id] else 0
    budget = limits.budget_for(max(len(c_ids) - c_bound, len(r_ids) - r_bound))
    cut = max(0, max(c_bound, r_bound) - budget)
    cut = min(cut, max(0, min(c_bound, r_bound) - lead))
    c_resp, r_resp = c_ids[c_bound:], r_ids[r_bound:]
    c_prompt = c_ids[:lead] + c_ids[lead + cut : c_bound]
    r_prompt = r_ids[:lead] + r_ids[lead + cut : r_bound]
    c_keep = max(0, limits.max_length - len(c_prompt))
    r_keep = max(0, limits.max_length - len(r_prompt))
    truncated = cut > 0 or len(c_resp) > c_keep or len(r_resp) > r_keep
    chosen_ids, rejected_ids = c_prompt + c_resp[:c_keep], r_prompt + r_resp[:r_keep]
    reason = ""
    if min(len(c_resp), len(r_resp)) < limits.min_response_tokens:
        reason = RESPONSE_TOO_SHORT
    elif min(c_keep, r_keep) < limits.min_response_tokens:
        reason = NO_ROOM_FOR_RESPONSE
    elif chosen_ids == rejected_ids:
        reason = IDENTICAL_TOKENS
    return EncodedPair(
        chosen_input_ids=chosen_ids,
        chosen_prompt_len=len(c_prompt),
        rejected_input_ids=rejected_ids,
        rejected_prompt_len=len(r_prompt),
        prompt_tokens=max(c_bound, r_bound),
        chosen_tokens=len(c_resp),
        rejected_tokens=len(r_resp),
        truncated=truncated,
        drop_reason=reason,
    )


def encode_rendered(rendered: Sequence[RenderedPair], tokenizer, limits: Limits) -> list[EncodedPair]:
    """Tokenize and truncate rendered pairs: one batch tokenizer call per ``CHARS_PER_CALL`` of text.

    A call's untruncated tokens and offsets (~200 bytes a token) live until its pairs are cut to
    ``max_length``, so the text per call, not the pairs per batch, bounds the memory.
    """
    special = SpecialTokens.of(tokenizer)
    out: list[EncodedPair] = []
    start = 0
    while start < len(rendered):
        stop, chars = start, 0
        while stop < len(rendered) and (stop == start or chars < CHARS_PER_CALL):
            r = rendered[stop]
            chars += 2 * len(r.prompt) + len(r.chosen) + len(r.rejected)
            stop += 1
        part = rendered[start:stop]
        prompts = [r.prompt for r in part]
        seqs = encode_sequences(prompts + prompts, [r.chosen for r in part] + [r.rejected for r in part],
                                tokenizer, special)
        n = len(part)
        out.extend(truncate_pair(seqs[i], seqs[n + i], limits, special.bos_id) for i in range(n))
        start = stop
    return out


def encode_pairs(pairs: Sequence[Pair], template: ChatTemplate, tokenizer, limits: Limits) -> list[EncodedPair]:
    """Render + tokenize + truncate a list of pairs."""
    return encode_rendered([render_pair(p, template, tokenizer) for p in pairs], tokenizer, limits)


# ------------------------------------------------------------------------------ datasets.map


def pair_columns(pairs: Sequence[Pair]) -> dict[str, list]:
    """Pairs -> Arrow-friendly columns: a string prompt goes to ``prompt``, a message list to ``messages``."""
    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for p in pairs:
        if isinstance(p.prompt, str):
            cols["prompt"].append(p.prompt)
            cols["messages"].append(None)
        else:
            cols["prompt"].append(None)
            cols["messages"].append([{"role": m["role"], "content": m["content"]} for m in p.prompt])
        cols["chosen"].append(p.chosen)
        cols["rejected"].append(p.rejected)
    return cols


def pairs_from_columns(batch: dict[str, list]) -> list[Pair]:
    """Inverse of ``pair_columns``."""
    return [
        Pair(
            prompt=text if text is not None else [Message(role=m["role"], content=m["content"]) for m in msgs],
            chosen=chosen,
            rejected=rejected,
        )
        for text, msgs, chosen, rejected in zip(
            batch["prompt"], batch["messages"], batch["chosen"], batch["rejected"], strict=True
        )
    ]


def tokenize_batch(
    batch: dict[str, list], indices: list[int], *, template: ChatTemplate, tokenizer, limits: Limits
) -> dict[str, list[Any]]:
    """``Dataset.map(batched=True, with_indices=True)`` function: pair columns -> token columns + stats."""
    pairs = pairs_from_columns(batch)
    rendered = []
    for i, pair in zip(indices, pairs, strict=True):
        try:
            rendered.append(render_pair(pair, template, tokenizer))
        except ChatTemplateError as err:
            raise ChatTemplateError(f"pair {i + 1}: {err}") from err
    encoded = encode_rendered(rendered, tokenizer, limits)
    return {col: [getattr(e, col) for e in encoded] for col in OUTPUT_COLUMNS + STAT_COLUMNS}
