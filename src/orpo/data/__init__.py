"""The preference-data pipeline: read -> normalize -> template -> tokenize -> collate."""

from orpo.data.collate import (
    PackedLayout,
    PackedSharedPromptLayout,
    PaddedLayout,
    PreferenceBatch,
    SharedPromptLayout,
    build_layout,
)
from orpo.data.formats import Message, NormalizedRows, Pair, normalize
from orpo.data.pipeline import DataSummary, LengthStats, PreparedData, prepare_data
from orpo.data.sources import DataError, RowSource, load_rows
from orpo.data.templates import (
    ChatTemplate,
    ChatTemplateError,
    RenderedPair,
    render_pair,
    render_prompt,
    resolve_chat_template,
)
from orpo.data.tokenize import EncodedPair, Limits, encode_pairs, encode_prompt

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "DataError",
    "DataSummary",
    "EncodedPair",
    "LengthStats",
    "Limits",
    "Message",
    "NormalizedRows",
    "PackedLayout",
    "PackedSharedPromptLayout",
    "PaddedLayout",
    "Pair",
    "PreferenceBatch",
    "PreparedData",
    "RenderedPair",
    "RowSource",
    "SharedPromptLayout",
    "build_layout",
    "encode_pairs",
    "encode_prompt",
    "load_rows",
    "normalize",
    "prepare_data",
    "render_pair",
    "render_prompt",
    "resolve_chat_template",
]
