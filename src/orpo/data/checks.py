"""Cheap checks of preference pairs: the faults ORPO learns from silently.

Noisy or contradictory pairs, pairs whose two responses barely differ, template text leaking into
responses and a length gap between chosen and rejected all train a model without any error. These
checks need no model, only the normalized pairs (and token counts when a tokenizer has run), so
``orpo train`` runs them on every dataset and ``orpo audit`` reports them with example rows.

Definitions (texts compared after stripping surrounding whitespace; a message-list prompt is
compared turn by turn, role and stripped content):

- ``duplicates``: a pair whose (prompt, chosen, rejected) equals an earlier pair's; every extra
  copy counts once.
- ``identical_pairs``: chosen equals rejected (rows training drops as ``chosen == rejected``, which
  are exactly equal, count too).
- ``conflicting_pairs``: another pair has the same prompt with chosen and rejected swapped; every
  such pair counts (both rows of a swapped couple).
- ``near_identical_pairs``: chosen and rejected differ in under ``NEAR_IDENTICAL`` (5%) of their
  characters, identical pairs excluded. The difference is 1 − 2·LCS / (len(a) + len(b)), with LCS
  the longest common subsequence of the two texts: the share of their characters left unmatched
  (rapidfuzz's normalized Indel distance). Linear in the data: each pair's distance is computed
  bit-parallel with a cutoff at the threshold (``near_identical``).
- ``empty_responses``: a row whose chosen or rejected response is empty or whitespace only
  (training drops it as a bad row).
- ``template_leaks``: a response containing chat-template markup: the role markers and special
  tokens the template emits, the tokenizer's special tokens, and HH transcript turns
  (``\\n\\nHuman:``, ``\\n\\nAssistant:``). The tokenizer turns special-token text into the special
  token itself, so a leaked ``<|im_end|>`` ends the turn mid-response.
- ``control_chars``: a prompt or response containing a control character other than tab, newline
  and carriage return (Unicode category Cc).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rapidfuzz.distance import Indel

from orpo.data.formats import Pair
from orpo.data.templates import ChatTemplate, ChatTemplateError

NEAR_IDENTICAL = 0.05  # max share of differing characters
# what a finding measures where its name does not say it all (``orpo audit --json``'s "definitions")
DEFINITIONS = {
    "near_identical_pairs": "chosen and rejected differ in under 5% of their characters: "
    "1 - 2*LCS/(len(chosen) + len(rejected)) < 0.05, LCS their longest common subsequence; identical pairs excluded",
    "conflicting_pairs": "another pair has the same prompt with chosen and rejected swapped",
}
MAX_EXAMPLES = 5
TEXT_FINDINGS = ("duplicates", "identical_pairs", "conflicting_pairs", "near_identical_pairs", "empty_responses",
                 "template_leaks", "control_chars")
# Markers that are never a legitimate part of one response: the HH transcript's turns.
TRANSCRIPT_MARKERS = ("\n\nHuman:", "\n\nAssistant:")
# What plain-text rendering (chat_template: none) writes between turns of a message-list prompt.
PLAIN_MARKERS = (*TRANSCRIPT_MARKERS, "\n\nUser:", "\n\nSystem:")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A markup token as templates write them: <|im_start|>, <|eot_id|>, </s>, <start_of_turn>, [INST]
_MARKUP = re.compile(r"<[^<>\s]{1,40}>|\[/?INST\]")
_PROBE = ("⟦SYSTEM⟧", "⟦USER⟧", "⟦ASSISTANT⟧")


@dataclass
class Finding:
    """How many rows have a fault, and up to ``MAX_EXAMPLES`` of them (as their source names them)."""

    count: int
    examples: list[Any]

    @classmethod
    def of(cls, refs: Sequence[Any], name=lambda r: r) -> Finding:
        return cls(count=len(refs), examples=[name(r) for r in list(refs)[:MAX_EXAMPLES]])


# ------------------------------------------------------------------------------ keys


def char_difference(a: str, b: str) -> float:
    """Share of the characters of ``a`` and ``b`` left out of their longest common subsequence (the module doc)."""
    return Indel.normalized_distance(a, b)


def near_identical(a: str, b: str, threshold: float = NEAR_IDENTICAL) -> bool:
    """``char_difference(a, b) < threshold``, exactly, at a bounded cost.

    The unmatched characters U = len(a) + len(b) − 2·LCS are rapidfuzz's Indel distance, computed
    bit-parallel (64 characters per machine word) and given the cutoff: it stops as soon as U
    must pass it: a pair of 10k-character answers costs under a millisecond here, 40k ones 7 ms
    (difflib's matcher, quadratic, took 2.15 s and 36.7 s).
    """
    total = len(a) + len(b)
    allowed = math.ceil(threshold * total) - 1  # the most unmatched characters still "under threshold"
    if allowed < 0 or total - 2 * min(len(a), len(b)) > allowed:
        return False
    return Indel.distance(a, b, score_cutoff=allowed) <= allowed


# ------------------------------------------------------------------------------ the checks


def find_faults(pairs: Iterable[Pair], refs: Sequence[Any], bad_rows: Iterable[tuple[Any, str]],
                markers: Sequence[str]) -> dict[str, list[Any]]:
    """The refs (sortable row references, e.g. ``(source, row)``) of the rows with each text fault.

    ``pairs``/``refs``: the valid pairs and their rows, in source order; ``bad_rows``: (ref, kind) of
    rows normalization dropped (their empty or identical responses count too). One pass over the
    pairs, keeping 16 bytes a pair: duplicates and swapped pairs are found by hashing the keys.
    """
    out: dict[str, list[Any]] = {name: [] for name in TEXT_FINDINGS}
    keys, swapped = np.zeros(len(refs), dtype=np.uint64), np.zeros(len(refs), dtype=np.uint64)
    leak = re.compile("|".join(re.escape(m) for m in sorted(set(markers), key=len, reverse=True))) if markers else None
    for k, (pair, ref) in enumerate(zip(pairs, refs, strict=True)):
        prompt, chosen, rejected = _prompt_text(pair), pair.chosen.strip(), pair.rejected.strip()
        keys[k], swapped[k] = _hash(prompt, chosen, rejected), _hash(prompt, rejected, chosen)
        if chosen == rejected:
            out["identical_pairs"].append(ref)
        elif near_identical(chosen, rejected):
            out["near_identical_pairs"].append(ref)
        if leak is not None and (leak.search(pair.chosen) or leak.search(pair.rejected)):
            out["template_leaks"].append(ref)
        if any(_CONTROL.search(text) for text in _texts(pair)):
            out["control_chars"].append(ref)
    _, first = np.unique(keys, return_index=True)
    repeat = np.ones(len(refs), dtype=bool)
    repeat[first] = False
    # identical pairs are their own swap: not a conflict
    conflict = np.isin(swapped, keys) & (swapped != keys)
    out["duplicates"] = [refs[i] for i in np.flatnonzero(repeat).tolist()]
    out["conflicting_pairs"] = [refs[i] for i in np.flatnonzero(conflict).tolist()]
    for ref, kind in bad_rows:
        if kind == "empty response":
            out["empty_responses"].append(ref)
        elif kind == "chosen == rejected":
            out["identical_pairs"].append(ref)
    return {name: sorted(found) for name, found in out.items()}


def prompt_overlap(train: Iterable[Pair], evaluation: Iterable[Pair]) -> list[int]:
    """Positions of the eval pairs whose prompt is also a training prompt (compared by hash)."""
    prompts = np.fromiter((_hash(_prompt_text(p)) for p in train), dtype=np.uint64)
    asked = np.fromiter((_hash(_prompt_text(p)) for p in evaluation), dtype=np.uint64)
    return np.flatnonzero(np.isin(asked, prompts)).tolist()


def _prompt_text(pair: Pair) -> str:
    """The prompt as the checks compare it (stripped; a message list turn by turn, role and content),
    as one string that tells a text prompt from a message list."""
    if isinstance(pair.prompt, str):
        return "t" + pair.prompt.strip()
    return "m" + "".join(f"{len(m['role'])}:{m['role']}{len(c := m['content'].strip())}:{c}" for m in pair.prompt)


def _hash(*texts: str) -> int:
    """64 bits of BLAKE2b over the length-prefixed texts: two different keys collide with
    probability 2^-64 a pair of pairs, about 3e-8 across a million pairs."""
    h = hashlib.blake2b(digest_size=8)
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


@dataclass
class LengthBias:
    """Preference methods learn length: how often and by how much chosen is the longer response."""

    chosen_longer_share: float
    mean_chosen_length: float
    mean_rejected_length: float
    length_unit: str  # "tokens" or "characters"

    @classmethod
    def of(cls, chosen: Sequence[int] | np.ndarray, rejected: Sequence[int] | np.ndarray, unit: str) -> LengthBias:
        c, r = np.asarray(chosen, dtype=np.int64), np.asarray(rejected, dtype=np.int64)
        if c.shape != r.shape:
            raise ValueError(f"{len(c)} chosen and {len(r)} rejected lengths")
        n = max(len(c), 1)
        return cls(chosen_longer_share=int((c > r).sum()) / n, mean_chosen_length=int(c.sum()) / n,
                   mean_rejected_length=int(r.sum()) / n, length_unit=unit)


def _texts(pair: Pair) -> list[str]:
    prompt = [pair.prompt] if isinstance(pair.prompt, str) else [m["content"] for m in pair.prompt]
    return [*prompt, pair.chosen, pair.rejected]


# ------------------------------------------------------------------------------ template markers


def leak_markers(template: ChatTemplate, tokenizer=None) -> list[str]:
    """Text that must not appear inside a response under ``template``: see the module doc.

    A jinja template's markers are read off a rendered probe conversation: the text it writes
    around the messages, split into markup tokens (``<|im_start|>``) and, where a line holds none,
    the stripped line (``### Instruction:``).
    """
    found: set[str] = set(PLAIN_MARKERS if template.is_plain else TRANSCRIPT_MARKERS)
    if tokenizer is not None:
        found |= {t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) >= 3}
    if not template.is_plain:
        text = _render_probe(template, tokenizer)
        for piece in re.split("|".join(map(re.escape, _PROBE)), text):
            for line in piece.splitlines():
                tokens = _MARKUP.findall(line)
                found |= set(tokens)
                if not tokens and len(line.strip()) >= 3:
                    found.add(line.strip())
    return sorted(found)


def _render_probe(template: ChatTemplate, tokenizer) -> str:
    messages = [{"role": role, "content": text} for role, text in zip(("system", "user", "assistant"), _PROBE,
                                                                      strict=True)]
    if tokenizer is not None:
        from orpo.data.templates import _apply

        try:
            return _apply(template, tokenizer, messages, add_generation_prompt=False)
        except Exception:  # a template that refuses a system turn: probe without it
            return _apply(template, tokenizer, messages[1:], add_generation_prompt=False)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template.jinja or "")
    try:
        return compiled.render(messages=messages, add_generation_prompt=False, bos_token="", eos_token="")
    except Exception:  # a template that refuses a system turn: probe without it
        try:
            return compiled.render(messages=messages[1:], add_generation_prompt=False, bos_token="", eos_token="")
        except Exception as err:
            raise ChatTemplateError(f"chat template {template.name!r} failed to render: "
                                    f"{type(err).__name__}: {err}") from None
