"""Prompts without responses, from any file orpo reads: what ``orpo generate --prompts`` completes.

A row is one prompt in one of the shapes users have: ``prompt`` (text or a message list),
``messages`` (a chat that ends in a user turn), or Alpaca's ``instruction`` (+ ``input``); an
optional ``system`` text is put first. A row that fits none is one ``DataError`` naming the file,
the row and the field, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orpo.data.formats import Message
from orpo.data.sources import DataError, UnreadableRow, load_rows

SHAPES = "'prompt' (text or messages), 'messages' ending in a user turn, or 'instruction' (+ 'input')"


@dataclass(frozen=True)
class PromptRow:
    """One prompt to complete: the messages (or plain text), and where it came from."""

    prompt: str | list[Message]
    number: Any
    where: str


def read_prompts(spec: str, split: str = "train") -> list[PromptRow]:
    """Every row of ``spec`` (a file or hub dataset) as a prompt; a bad row raises naming it."""
    source = load_rows(spec, split)
    out = []
    for i, row in enumerate(source.rows):
        where = source.where(i)
        if isinstance(row, UnreadableRow):
            raise DataError(f"{where}: {row.reason}")
        out.append(PromptRow(_prompt(row, where), source.number(i), where))
    if not out:
        raise DataError(f"{source.name}: no prompts in it")
    return out


def _prompt(row: dict[str, Any], where: str) -> str | list[Message]:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be text, got {type(system).__name__}")
    if "prompt" in row:
        prompt = _text_or_messages(row["prompt"], where, "prompt")
    elif "messages" in row:
        prompt = _text_or_messages(row["messages"], where, "messages")
    elif "instruction" in row:
        instruction, extra = row["instruction"], row.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise DataError(f"{where}: fields 'instruction' and 'input' must be text")
        prompt = instruction if not extra else f"{instruction}\n\n{extra}"
    else:
        raise DataError(f"{where}: no prompt: a row needs {SHAPES} (it has {sorted(row)[:8]})")
    if system:
        turns = prompt if isinstance(prompt, list) else [Message(role="user", content=prompt)]
        if turns[0]["role"] == "system":
            raise DataError(f"{where}: both a 'system' field and a system message")
        prompt = [Message(role="system", content=system), *turns]
    return prompt


def _text_or_messages(value: Any, where: str, field: str) -> str | list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return value
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be text or a non-empty list of messages")
    messages = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}' message {k}: needs text 'role' and 'content'")
        messages.append(Message(role=m["role"], content=m["content"]))
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: field '{field}' ends in a {messages[-1]['role']!r} turn; a prompt ends in a "
                        "'user' turn (drop the assistant's reply)")
    return messages
