"""Row formats: detect which one a dataset uses and normalize every row to a ``Pair``.

(Contract only; the implementation is in progress.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


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
