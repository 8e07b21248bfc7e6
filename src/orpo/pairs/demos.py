"""Demonstrations to build pairs from: any file or hub dataset orpo reads, SFT data included.

A row is one prompt and, where the data has one, its reference response: ``prompt`` + ``response``,
``instruction`` (+ ``input``) + ``output``, ``messages`` ending in an assistant turn, or a preference
row (any format training reads: its prompt and chosen response; the rejected one is ignored). A
prompt-only row (``prompt``, ``messages`` ending in a user turn) has no reference, which the
sampling strategies do not need. IFEval's ``instruction_id_list`` and ``kwargs`` ride along for
``--verify ifeval``. Every bad row is one ``DataError`` naming the file, the row and the field,
before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from orpo.data.formats import Message, RowError, detect_format, to_pair
from orpo.data.prompts import _prompt
from orpo.data.sources import DataError, UnreadableRow, load_rows

IFEVAL_FIELDS = ("instruction_id_list", "kwargs")


@dataclass(frozen=True)
class Demo:
    """One source row: its prompt, its reference response (None: prompt only), and where it is."""

    prompt: str | list[Message]
    response: str | None
    index: int
    number: Any
    where: str
    ifeval: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Demos:
    name: str
    rows: list[Demo]
    # rows training drops too, by reason (HH's few turns with an empty response)
    skipped: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A hash of what the pairs are built from, so a resumed run refuses a source that changed."""
        digest = hashlib.sha256()
        for d in self.rows:
            digest.update(json.dumps([d.prompt, d.response, d.ifeval], ensure_ascii=False, sort_keys=True).encode())
            digest.update(b"\n")
        return digest.hexdigest()[:16]


def read_demos(spec: str, split: str = "train", need_response: bool = False, need_ifeval: bool = False) -> Demos:
    """Every row of ``spec`` as a ``Demo``; the first bad row raises naming it."""
    source = load_rows(spec, split)
    out = []
    skipped: dict[str, int] = {}
    for i, row in enumerate(source.rows):
        where = source.where(i)
        if isinstance(row, UnreadableRow):
            raise DataError(f"{where}: {row.reason}")
        try:
            prompt, response = _demo(row, where)
        except _Skip as skip:
            skipped[skip.kind] = skipped.get(skip.kind, 0) + 1
            continue
        if need_response and response is None:
            raise DataError(f"{where}: no reference response: --strategy reference-vs-sample needs 'response' "
                            "(or 'output', 'chosen', or 'messages' ending in an assistant turn)")
        ifeval = None
        if need_ifeval:
            missing = [f for f in IFEVAL_FIELDS if f not in row]
            if missing or not isinstance(row["instruction_id_list"], list) or not isinstance(row["kwargs"], list):
                raise DataError(f"{where}: field '{missing[0] if missing else 'instruction_id_list'}': --verify "
                                "ifeval needs IFEval rows (a list 'instruction_id_list' and a list 'kwargs')")
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            ifeval = {"prompt": text, "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
        out.append(Demo(prompt, response, i, source.number(i), where, ifeval))
    if not out:
        raise DataError(f"{source.name}: no rows in it" + (f" (skipped: {skipped})" if skipped else ""))
    return Demos(source.name, out, skipped)


def _demo(row: dict[str, Any], where: str) -> tuple[str | list[Message], str | None]:
    if "prompt" in row and "chosen" in row and "rejected" not in row:
        # a preference row without its rejected response is a demonstration
        return _prompt(row, where), _text(row["chosen"], where, "chosen")
    if "chosen" in row or "conversations" in row:
        return _preference(row, where)
    if "messages" in row and isinstance(row["messages"], list) and row["messages"] \
            and isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") == "assistant":
        *turns, last = row["messages"]
        if not turns:
            raise DataError(f"{where}: field 'messages': only an assistant turn, no prompt before it")
        prompt = _prompt({**row, "messages": turns}, where)
        return prompt, _text(last.get("content"), where, "messages")
    for key in ("response", "output", "completion"):
        if key in row:
            return _prompt(row, where), _text(row[key], where, key)
    return _prompt(row, where), None


class _Skip(Exception):
    def __init__(self, kind: str) -> None:
        self.kind = kind


def _preference(row: dict[str, Any], where: str) -> tuple[str | list[Message], str]:
    try:
        pair = to_pair(row, detect_format(row))
    except RowError as err:
        if err.always_skip:
            raise _Skip(err.kind) from err
        raise DataError(f"{where}: {err}") from err
    except DataError as err:
        raise DataError(f"{where}: {err}") from err
    return pair.prompt, pair.chosen


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}' must be non-empty text, got "
                        + (repr(value) if isinstance(value, str) else type(value).__name__))
    return value
