"""Row formats: detect which one a dataset uses and normalize every row to a ``Pair``.

| format           | a row looks like                                                                   |
|------------------|------------------------------------------------------------------------------------|
| ``standard``     | ``prompt``, ``chosen``, ``rejected``: strings                                       |
| ``implicit``     | ``chosen``, ``rejected``: full texts sharing the prompt (Anthropic HH)              |
| ``conversational`` | ``prompt`` message list + ``chosen``/``rejected`` one-message lists; or            |
|                  | ``chosen``/``rejected`` full conversations differing in the last turn (a string    |
|                  | ``prompt`` column is ignored); or ``chosen_messages``/``rejected_messages``, whose  |
|                  | content may be a list of text parts                                                 |
| ``sharegpt``     | ``conversations`` [{from, value}], optional ``system``, ``chosen``/``rejected``     |
|                  | {from, value}                                                                       |
| ``columns``      | any three text columns named by a mapping {prompt, chosen, rejected}                |

Every problem with a row is a ``RowError`` naming the field; ``normalize`` adds where the row is.
"""

from __future__ import annotations

import os
import re
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from orpo.data.sources import DataError, RowSource, UnreadableRow, clip

__all__ = [
    "FORMATS",
    "DataError",
    "Message",
    "NormalizedRows",
    "Pair",
    "RowError",
    "detect_format",
    "implicit_prompt",
    "known_columns",
    "normalize",
    "to_pair",
]


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Pair:
    """One preference pair, format-free.

    ``prompt`` is raw text (``str``) when the source is plain text (standard, implicit, columns)
    and a message list when the source is structured (conversational, ShareGPT). ``chosen`` and
    ``rejected`` are the two final assistant responses as text.
    """

    prompt: str | list[Message]
    chosen: str
    rejected: str


class RowError(DataError):
    """One bad row: the field at fault, why, and a short ``kind`` to count skipped rows by.

    ``always_skip`` marks rows that are dropped and counted even under ``on_bad_row: error``:
    only an implicit-prompt row whose response is empty (Anthropic HH has a few such turns:
    4 of 1,800 in harmless-dev), a known artifact of that data rather than a broken file.
    """

    def __init__(self, field: str | None, reason: str, kind: str, always_skip: bool = False) -> None:
        super().__init__(f"field '{field}': {reason}" if field is not None else reason)
        self.field = field
        self.reason = reason
        self.kind = kind
        self.always_skip = always_skip


@dataclass
class NormalizedRows:
    """The pairs of one source, with what was dropped and why (for the data summary)."""

    pairs: Sequence[Pair]  # a list, or pairs on disk (``normalize(store=...)``)
    format: str
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    # the source row (0-based) of each pair: an array('q'), 8 bytes a pair
    indices: Sequence[int] = field(default_factory=list)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (source row, kind) of each skipped row


ColumnMap = Mapping[str, str]

HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# Datasets whose columns we know, so that ``auto`` needs no mapping for them.
KNOWN_COLUMN_MAPS: tuple[dict[str, str], ...] = (
    {"prompt": "question", "chosen": "response_j", "rejected": "response_k"},  # lvwerra/stack-exchange-paired
)
MAX_ERROR_EXAMPLES = 5

FORMAT_HELP = (
    "standard: prompt, chosen, rejected (strings); "
    "implicit: chosen, rejected (full texts sharing the prompt); "
    "conversational: prompt + chosen + rejected message lists, chosen + rejected full conversations, "
    "or chosen_messages + rejected_messages; "
    "sharegpt: conversations + chosen + rejected ({from, value}); "
    "columns: any three text columns named by data.columns {prompt, chosen, rejected}"
)


# ---------------------------------------------------------------- detection


def detect_format(row: Mapping[str, Any], columns: ColumnMap | None = None) -> str:
    """Name the format of ``row`` from its keys (and whether ``chosen`` holds a list).

    Types matter only to tell lists from text, so that a first row with a bad value (say
    ``chosen: null``) is still detected and then reported as a bad row, not an unknown format.
    """
    keys = set(row)
    if columns:
        return "columns"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"chosen_messages", "rejected_messages"} <= keys:
        return "conversational"
    if {"chosen", "rejected"} <= keys:
        if isinstance(row["chosen"], list) or isinstance(row.get("prompt"), list):
            return "conversational"
        return "standard" if "prompt" in keys else "implicit"
    if known_columns(row) is not None:
        return "columns"
    raise DataError(f"cannot tell the row format from its keys {_keys(row)}; expected {FORMAT_HELP}")


def known_columns(row: Mapping[str, Any]) -> dict[str, str] | None:
    """The built-in column mapping whose columns ``row`` has, if any."""
    for mapping in KNOWN_COLUMN_MAPS:
        if set(mapping.values()) <= set(row):
            return dict(mapping)
    return None


# ---------------------------------------------------------------- normalization


def to_pair(row: Mapping[str, Any] | UnreadableRow, fmt: str, columns: ColumnMap | None = None) -> Pair:
    """Convert one row of format ``fmt`` (or ``auto``) to a Pair; a bad row raises ``RowError``."""
    if isinstance(row, UnreadableRow):
        raise RowError(row.field, row.reason, row.kind)
    if fmt == "auto":
        fmt = detect_format(row, columns)
    if fmt not in CONVERTERS:
        raise DataError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if fmt == "columns":
        columns = _column_map(row, columns)
    return CONVERTERS[fmt](row, columns)


def normalize(
    source: RowSource,
    fmt: str = "auto",
    columns: ColumnMap | None = None,
    on_bad_row: str = "error",
    store: Path | None = None,
    limit: int | None = None,
) -> NormalizedRows:
    """Convert every row of ``source`` to a Pair, in one pass; the format is told from the first
    readable row (the rows before it are unreadable, which every format reports alike).

    ``on_bad_row="error"`` stops at the first bad row with its location, field and reason;
    ``"skip"`` drops bad rows and counts them by kind. No valid pair at all is always an error.
    ``store``: write the pairs to an Arrow file there as they come (``stored.StoredPairs``), so
    that no list of every pair is kept. ``limit``: stop reading once that many pairs are read.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    from orpo.data.stored import PairWriter

    writer = PairWriter(store) if store is not None else None
    pairs: list[Pair] = []
    indices = array("q")
    bad_rows: list[tuple[int, str]] = []
    skipped: Counter[str] = Counter()
    first_errors: list[str] = []
    detected = False
    rows = 0
    try:
        for i, row in enumerate(source.rows):
            if limit is not None and len(indices) >= limit:
                break
            rows += 1
            if not detected and not isinstance(row, UnreadableRow):
                detected = True
                try:
                    if fmt == "auto":
                        fmt = detect_format(row, columns)
                    if fmt == "columns":
                        columns = _column_map(row, columns)
                except DataError as err:
                    raise DataError(f"{source.name}: {err}") from err
            try:
                pair = to_pair(row, fmt, columns)
            except RowError as err:
                message = f"{source.where(i)}: {err}"
                if on_bad_row == "error" and not err.always_skip:
                    raise DataError(message) from err
                skipped[err.kind] += 1
                bad_rows.append((i, err.kind))
                if len(first_errors) < MAX_ERROR_EXAMPLES:
                    first_errors.append(message)
                continue
            indices.append(i)
            if writer is not None:
                writer.append(pair)
            else:
                pairs.append(pair)
        if not rows:
            raise DataError(f"{source.name}: no rows")
        if not indices:
            counts = ", ".join(f"{kind}: {n}" for kind, n in skipped.most_common())
            raise DataError(f"{source.name}: all {rows} rows are bad ({counts}); first: {first_errors[0]}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    kept: Sequence[Pair] = writer.close() if writer is not None else pairs
    return NormalizedRows(kept, fmt, rows, dict(skipped), first_errors, indices, bad_rows)


def implicit_prompt(chosen: str, rejected: str) -> str:
    """The shared prompt of two full texts: their common prefix, cut back to a clean boundary.

    With an HH ``"\\n\\nAssistant:"`` marker in the prefix, the prompt ends right after the last
    one, so responses keep their leading space (as HH was written). Without one, cut at the last
    whitespace so no word is split between prompt and response.
    """
    prefix = os.path.commonprefix([chosen, rejected])
    marker = prefix.rfind(HH_ASSISTANT)
    if marker >= 0:
        return prefix[: marker + len(HH_ASSISTANT)]
    last_space = re.search(r"\s\S*\Z", prefix)
    return prefix[: last_space.start()] if last_space else ""


# ---------------------------------------------------------------- converters, one per format


def _standard(row: Mapping[str, Any], columns: ColumnMap | None) -> Pair:
    return _text_pair(row, "prompt", "chosen", "rejected")


def _columns(row: Mapping[str, Any], columns: ColumnMap | None) -> Pair:
    assert columns is not None  # resolved by to_pair
    return _text_pair(row, columns["prompt"], columns["chosen"], columns["rejected"])


def _implicit(row: Mapping[str, Any], columns: ColumnMap | None) -> Pair:
    chosen = _text(_get(row, "chosen"), "chosen")
    rejected = _text(_get(row, "rejected"), "rejected")
    prompt = implicit_prompt(chosen, rejected)
    if not prompt.strip():
        raise RowError("chosen", "shares no prompt with 'rejected' (no common prefix)", "no common prompt")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[len(prompt) :].strip():
            raise RowError(key, "empty response after the shared prompt", "empty response", always_skip=True)
    return _pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :])


def _conversational(row: Mapping[str, Any], columns: ColumnMap | None) -> Pair:
    # a null counts as absent: a Parquet file with rows of several shapes has every column in every row
    if row.get("chosen_messages") is not None or row.get("rejected_messages") is not None:
        return _from_conversations(row, "chosen_messages", "rejected_messages")
    if isinstance(row.get("prompt"), list):
        prompt = _prompt_messages(_messages(row["prompt"], "prompt"), "prompt")
        return _pair(prompt, _single_reply(row, "chosen"), _single_reply(row, "rejected"))
    return _from_conversations(row, "chosen", "rejected")


def _sharegpt(row: Mapping[str, Any], columns: ColumnMap | None) -> Pair:
    turns = _get(row, "conversations")
    if not isinstance(turns, list):
        raise RowError("conversations", f"expected a list of turns, got {_type(turns)}", "not a message list")
    messages = [_sharegpt_message(turn, f"conversations[{i}]") for i, turn in enumerate(turns)]
    system = row.get("system")
    if system is not None and _text(system, "system").strip():
        messages.insert(0, Message(role="system", content=system))
    prompt = _prompt_messages(messages, "conversations")
    chosen = _reply(_sharegpt_message(_get(row, "chosen"), "chosen"), "chosen")
    rejected = _reply(_sharegpt_message(_get(row, "rejected"), "rejected"), "rejected")
    return _pair(prompt, chosen, rejected)


CONVERTERS: dict[str, Callable[[Mapping[str, Any], ColumnMap | None], Pair]] = {
    "standard": _standard,
    "implicit": _implicit,
    "conversational": _conversational,
    "sharegpt": _sharegpt,
    "columns": _columns,
}
FORMATS = tuple(CONVERTERS)


# ---------------------------------------------------------------- shared pieces


def _column_map(row: Mapping[str, Any], columns: ColumnMap | None) -> ColumnMap:
    """The mapping to use for format ``columns``: the given one, else a known one for ``row``."""
    mapping = columns if columns else known_columns(row)
    if mapping is None:
        raise DataError(
            f"format 'columns' needs a mapping {{prompt, chosen, rejected}} (data.columns); "
            f"the row has keys {_keys(row)}"
        )
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(mapping.get(k), str)]
    if missing:
        raise DataError(f"column mapping {dict(mapping)} lacks a column name for {', '.join(missing)}")
    return mapping


def _text_pair(row: Mapping[str, Any], prompt_key: str, chosen_key: str, rejected_key: str) -> Pair:
    prompt = _text(_get(row, prompt_key), prompt_key)
    if not prompt.strip():
        raise RowError(prompt_key, "empty prompt", "empty prompt")
    return _pair(
        prompt,
        _response(_get(row, chosen_key), chosen_key),
        _response(_get(row, rejected_key), rejected_key),
    )


def _pair(prompt: str | list[Message], chosen: str, rejected: str) -> Pair:
    if chosen == rejected:
        raise RowError("rejected", "same response as 'chosen'", "chosen == rejected")
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected)


def _get(mapping: Mapping[str, Any], key: str, path: str | None = None) -> Any:
    if key not in mapping:
        path = f"{path}.{key}" if path else key
        raise RowError(path, f"missing (keys present: {_keys(mapping)})", "missing field")
    return mapping[key]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_type(value)}", "not a string")
    if not value.isascii():
        # A JSON escape such as "\ud800" gives a lone surrogate: no tokenizer or Arrow column takes it.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RowError(
                field, f"not valid Unicode: lone surrogate {value[err.start]!r} at character {err.start}",
                "invalid unicode",
            ) from None
    return value


def _response(value: Any, field: str) -> str:
    text = _text(value, field)
    if not text.strip():
        raise RowError(field, "empty response", "empty response")
    return text


def _keys(row: Mapping[Any, Any]) -> str:
    return clip(repr(sorted(row, key=str)))


def _type(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {_type(value)}", "not a message list")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(value: Any, field: str) -> Message:
    if not isinstance(value, Mapping):
        raise RowError(field, f"expected a message {{role, content}}, got {_type(value)}", "bad message")
    role = _text(_get(value, "role", field), f"{field}.role")
    if role not in ROLES:
        raise RowError(
            f"{field}.role", f"unknown role {clip(repr(role))}; expected one of {', '.join(ROLES)}", "unknown role"
        )
    return Message(role=role, content=_content(_get(value, "content", field), f"{field}.content"))


def _content(value: Any, field: str) -> str:
    """Message content as text; a list of text parts (``{"type": "text", "text"|"value": ...}``) is joined."""
    if not isinstance(value, list):
        return _text(value, field)
    texts = []
    for i, part in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(part, Mapping):
            raise RowError(where, f"expected a content part {{type, text}}, got {_type(part)}", "bad message")
        if part.get("type", "text") != "text":
            raise RowError(where, f"unsupported content type {clip(repr(part['type']))}; only text", "non-text content")
        key = "text" if "text" in part else "value"
        texts.append(_text(_get(part, key, where), f"{where}.{key}"))
    return "".join(texts)


def _sharegpt_message(value: Any, field: str) -> Message:
    if not isinstance(value, Mapping):
        raise RowError(field, f"expected a turn {{from, value}}, got {_type(value)}", "bad message")
    speaker = _text(_get(value, "from", field), f"{field}.from")
    role = SHAREGPT_ROLES.get(speaker)
    if role is None:
        known = ", ".join(SHAREGPT_ROLES)
        raise RowError(f"{field}.from", f"unknown role {clip(repr(speaker))}; expected one of {known}", "unknown role")
    return Message(role=role, content=_text(_get(value, "value", field), f"{field}.value"))


def _prompt_messages(messages: list[Message], field: str) -> list[Message]:
    """A prompt must have turns and end with the user's, so the model answers next."""
    if not messages:
        raise RowError(field, "no prompt messages", "empty prompt")
    if messages[-1]["role"] != "user":
        raise RowError(
            field, f"the prompt must end with a user turn, not {messages[-1]['role']!r}", "bad prompt"
        )
    return messages


def _reply(message: Message, field: str) -> str:
    if message["role"] != "assistant":
        raise RowError(
            field, f"the response must come from the assistant, not {message['role']!r}", "bad response"
        )
    return _response(message["content"], field)


def _single_reply(row: Mapping[str, Any], key: str) -> str:
    messages = _messages(_get(row, key), key)
    if len(messages) != 1:
        raise RowError(key, f"expected one assistant message, got {len(messages)}", "bad response")
    return _reply(messages[0], f"{key}[0]")


def _from_conversations(row: Mapping[str, Any], chosen_key: str, rejected_key: str) -> Pair:
    """Two full conversations: all but the last turn is the prompt and must be the same in both."""
    chosen = _messages(_get(row, chosen_key), chosen_key)
    rejected = _messages(_get(row, rejected_key), rejected_key)
    for key, conversation in ((chosen_key, chosen), (rejected_key, rejected)):
        if len(conversation) < 2:
            raise RowError(
                key,
                f"expected prompt turns and a final assistant reply, got {len(conversation)} message(s)",
                "bad response",
            )
    prompt = _prompt_messages(chosen[:-1], chosen_key)
    if rejected[:-1] != prompt:
        raise RowError(rejected_key, f"differs from '{chosen_key}' before the last turn", "prompt mismatch")
    return _pair(
        prompt,
        _reply(chosen[-1], f"{chosen_key}[{len(chosen) - 1}]"),
        _reply(rejected[-1], f"{rejected_key}[{len(rejected) - 1}]"),
    )
