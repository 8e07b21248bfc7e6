"""Row formats: every format from the real assets, and a clear error (or skip count) for each bad row."""

from __future__ import annotations

import json

import pytest

from orpo.data.formats import (
    DataError,
    Pair,
    RowError,
    detect_format,
    implicit_prompt,
    normalize,
    to_pair,
)
from orpo.data.sources import RowSource, load_rows

SHAREGPT_ROLE = {"system": "system", "human": "user", "gpt": "assistant"}


def text_of(parts: list[dict]) -> str:
    return "".join(p["value"] for p in parts)


# ---------------------------------------------------------------- real assets


def test_sharegpt_file(preference_dir):
    path = preference_dir / "llamafactory_dpo_en_demo.json"
    raw = json.loads(path.read_text())
    normalized = normalize(load_rows(str(path)))
    assert normalized.format == "sharegpt"
    assert (normalized.rows_read, len(normalized.pairs), normalized.skipped) == (300, 300, {})
    with_system = multi_turn = 0
    for row, pair in zip(raw, normalized.pairs, strict=True):
        expected = [{"role": SHAREGPT_ROLE[t["from"]], "content": t["value"]} for t in row["conversations"]]
        assert pair.prompt == expected
        roles = [m["role"] for m in pair.prompt]
        assert roles[-1] == "user"
        assert "system" not in roles[1:]
        with_system += roles[0] == "system"
        multi_turn += roles.count("user") > 1
        assert (pair.chosen, pair.rejected) == (row["chosen"]["value"], row["rejected"]["value"])
    assert (with_system, multi_turn) == (80, 106)  # as documented in shared/assets/README.md


def test_sharegpt_top_level_system_comes_first():
    row = {
        "system": "You are terse.",
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello."},
        "rejected": {"from": "gpt", "value": "Good day to you, dear friend."},
    }
    assert to_pair(row, "auto").prompt == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ]


def test_orca_message_lists_with_content_parts(preference_dir):
    path = preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    normalized = normalize(load_rows(str(path)))
    assert normalized.format == "conversational"
    assert len(normalized.pairs) == 10
    for row, pair in zip(raw, normalized.pairs, strict=True):
        # loss_weight and the part wrappers are dropped: plain {role, content} messages remain.
        assert pair.prompt == [
            {"role": m["role"], "content": text_of(m["content"])} for m in row["chosen_messages"][:-1]
        ]
        assert [m["role"] for m in pair.prompt] == ["system", "user"]
        assert pair.chosen == text_of(row["chosen_messages"][-1]["content"])
        assert pair.rejected == text_of(row["rejected_messages"][-1]["content"])


def test_content_parts_are_joined_and_accept_text_or_value():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "value": "world"}]
    row = {
        "chosen_messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "A"}],
        "rejected_messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "B"}],
    }
    assert to_pair(row, "auto").prompt == [{"role": "user", "content": "Hello, world"}]


def test_stack_exchange_is_a_known_column_mapping(preference_dir):
    path = preference_dir / "torchtune_stack_exchange_paired_tiny.json"
    raw = json.loads(path.read_text())
    normalized = normalize(load_rows(str(path)))
    assert normalized.format == "columns"
    assert normalized.pairs == [Pair(r["question"], r["response_j"], r["response_k"]) for r in raw]


def test_explicit_column_mapping_takes_precedence(preference_dir):
    source = load_rows(str(preference_dir / "torchtune_stack_exchange_paired_tiny.json"))
    swapped = {"prompt": "question", "chosen": "response_k", "rejected": "response_j"}
    pair = normalize(source, columns=swapped).pairs[0]
    assert (pair.chosen, pair.rejected) == (source.rows[0]["response_k"], source.rows[0]["response_j"])


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_hh_implicit_prompt(hh_path, on_bad_row):
    source = load_rows(str(hh_path))
    normalized = normalize(source, on_bad_row=on_bad_row)
    assert normalized.format == "implicit"
    # Four HH rows have an empty chosen response ("...\n\nAssistant: " and nothing more).
    assert normalized.skipped == {"empty response": 4}
    assert len(normalized.pairs) == normalized.rows_read - 4 == 1796
    assert [e.split(":")[0].rsplit(" ", 1)[-1] for e in normalized.first_errors] == [
        "87",
        "517",
        "926",
        "1104",
    ]
    good_rows = [r for r in source.rows if not r["chosen"].rstrip().endswith("\n\nAssistant:")]
    for row, pair in zip(good_rows, normalized.pairs, strict=True):
        assert pair.prompt.endswith("\n\nAssistant:")
        assert pair.prompt + pair.chosen == row["chosen"]
        assert pair.prompt + pair.rejected == row["rejected"]
        assert pair.chosen.strip() and pair.rejected.strip()
        assert pair.chosen.startswith(" ")  # the response keeps its leading space


def test_hh_empty_responses_are_dropped_and_named_even_under_error(hh_path):
    """HH's empty turns are an artifact of the data, not a broken file: drop, count, name them."""
    normalized = normalize(load_rows(str(hh_path)), on_bad_row="error")
    assert normalized.first_errors[0].endswith(
        "harmless-dev.jsonl.gz line 87: field 'chosen': empty response after the shared prompt"
    )


def test_empty_response_outside_implicit_format_is_an_error():
    rows = [standard(), standard(chosen="  ")]
    with pytest.raises(DataError, match=r"mem\.json row 2: field 'chosen': empty response"):
        normalize(RowSource("mem.json", rows))


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        (
            "\n\nHuman: hi\n\nAssistant: Hello!",
            "\n\nHuman: hi\n\nAssistant: Hey.",
            "\n\nHuman: hi\n\nAssistant:",
        ),
        # The shared "Sure," belongs to both responses, not to the prompt.
        ("Q\n\nAssistant: Sure, yes", "Q\n\nAssistant: Sure, no", "Q\n\nAssistant:"),
        # No marker: cut at the last whitespace so "ca" is not split from "cat"/"car".
        ("Question: pet?\nAnswer: a cat", "Question: pet?\nAnswer: a car", "Question: pet?\nAnswer: a"),
        ("Answer: yes", "Answer: no", "Answer:"),
        ("abc", "abd", ""),
    ],
)
def test_implicit_prompt_boundary(chosen, rejected, prompt):
    assert implicit_prompt(chosen, rejected) == prompt


# ---------------------------------------------------------------- conversational variants


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_full_conversations_with_string_prompt_column():
    """UltraFeedback-binarized style: the prompt string is redundant with the shared turns."""
    turns = [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Joke?")]
    row = {
        "prompt": "Hi",
        "chosen": [*turns, msg("assistant", "Knock knock.")],
        "rejected": [*turns, msg("assistant", "No.")],
        "score_chosen": 8.0,
    }
    assert detect_format(row) == "conversational"
    assert to_pair(row, "conversational") == Pair(turns, "Knock knock.", "No.")


def test_full_conversations_must_share_the_prompt():
    row = {
        "chosen": [msg("user", "Hi"), msg("assistant", "A")],
        "rejected": [msg("user", "Hello"), msg("assistant", "B")],
    }
    with pytest.raises(RowError, match="field 'rejected': differs from 'chosen' before the last turn"):
        to_pair(row, "auto")


# ---------------------------------------------------------------- bad rows


def standard(**changes) -> dict:
    return {"prompt": "Why?", "chosen": "Because.", "rejected": "No idea."} | changes


def chat(**changes) -> dict:
    row = {
        "prompt": [msg("user", "Hi")],
        "chosen": [msg("assistant", "Hello")],
        "rejected": [msg("assistant", "Go away")],
    }
    return row | changes


def sharegpt(**changes) -> dict:
    row = {
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello"},
        "rejected": {"from": "gpt", "value": "Go away"},
    }
    return row | changes


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (standard(), "standard"),
        (standard(chosen=None), "standard"),  # a bad value still detects, then fails as a bad row
        ({"chosen": "Q: a", "rejected": "Q: b"}, "implicit"),
        (chat(), "conversational"),
        (chat(prompt="Hi", chosen=[msg("user", "Hi"), msg("assistant", "A")]), "conversational"),
        ({"chosen_messages": [], "rejected_messages": []}, "conversational"),
        (sharegpt(), "sharegpt"),
        ({"question": "Q", "response_j": "A", "response_k": "B"}, "columns"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_with_a_mapping_is_columns():
    assert (
        detect_format(
            {"q": "Q", "good": "A", "bad": "B"}, {"prompt": "q", "chosen": "good", "rejected": "bad"}
        )
        == "columns"
    )


BAD_ROWS = [
    # (row, format, message, kind)
    ({"prompt": "Why?", "chosen": "Because."}, "standard", "field 'rejected': missing", "missing field"),
    (standard(rejected=3), "standard", "field 'rejected': expected a string, got int", "not a string"),
    (standard(chosen=None), "standard", "field 'chosen': expected a string, got None", "not a string"),
    (standard(chosen=" \n "), "standard", "field 'chosen': empty response", "empty response"),
    (standard(prompt=""), "standard", "field 'prompt': empty prompt", "empty prompt"),
    (
        standard(rejected="Because."),
        "standard",
        "field 'rejected': same response as 'chosen'",
        "chosen == rejected",
    ),
    (
        {"chosen": "Same text", "rejected": "Same text"},
        "implicit",
        "field 'rejected': same response",
        "chosen == rejected",
    ),
    (chat(prompt=[]), "conversational", "field 'prompt': no prompt messages", "empty prompt"),
    (
        chat(prompt=[msg("bot", "Hi")]),
        "conversational",
        "field 'prompt[0].role': unknown role 'bot'",
        "unknown role",
    ),
    (
        chat(prompt=[{"role": "user"}]),
        "conversational",
        "field 'prompt[0].content': missing",
        "missing field",
    ),
    (
        chat(prompt=[msg("user", "Hi"), msg("assistant", "Yes?")]),
        "conversational",
        "must end with a user turn",
        "bad prompt",
    ),
    (
        chat(chosen=[msg("assistant", "A"), msg("assistant", "B")]),
        "conversational",
        "field 'chosen': expected one assistant message, got 2",
        "bad response",
    ),
    (
        chat(rejected=[msg("user", "B")]),
        "conversational",
        "field 'rejected[0]': the response must come from the assistant",
        "bad response",
    ),
    (
        chat(chosen=[msg("assistant", "")]),
        "conversational",
        "field 'chosen[0]': empty response",
        "empty response",
    ),
    (
        chat(chosen="Hello"),
        "conversational",
        "field 'chosen': expected a list of messages, got str",
        "not a message list",
    ),
    (
        chat(chosen=[{"role": "assistant", "content": [{"type": "image", "url": "x"}]}]),
        "conversational",
        "unsupported content type 'image'",
        "non-text content",
    ),
    (
        sharegpt(conversations=[{"from": "observation", "value": "{}"}]),
        "sharegpt",
        "field 'conversations[0].from': unknown role 'observation'",
        "unknown role",
    ),
    (
        sharegpt(chosen="Hello"),
        "sharegpt",
        "field 'chosen': expected a turn {from, value}, got str",
        "bad message",
    ),
    (
        sharegpt(rejected={"from": "human", "value": "x"}),
        "sharegpt",
        "field 'rejected': the response must come from the assistant, not 'user'",
        "bad response",
    ),
    (sharegpt(system=7), "sharegpt", "field 'system': expected a string, got int", "not a string"),
]


@pytest.mark.parametrize(("row", "fmt", "message", "kind"), BAD_ROWS)
def test_bad_row_names_the_field_and_reason(row, fmt, message, kind):
    with pytest.raises(RowError) as info:
        to_pair(row, fmt)
    assert message in str(info.value)
    assert info.value.kind == kind


def test_first_bad_row_stops_with_file_line_field_and_reason(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(standard())] * 5 + ["", json.dumps(standard(rejected=42))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"^.*data\.jsonl line 7: field 'rejected': expected a string, got int$"
    ):
        normalize(load_rows(str(path)))


def test_skip_counts_bad_rows_by_reason():
    rows = [
        standard(),
        standard(chosen=None),
        standard(chosen=""),
        standard(rejected=1),
        standard(chosen="No idea."),
    ]
    result = normalize(RowSource("mem.json", rows), on_bad_row="skip")
    assert result.pairs == [Pair("Why?", "Because.", "No idea.")]
    assert result.rows_read == 5
    assert result.skipped == {"not a string": 2, "empty response": 1, "chosen == rejected": 1}
    assert result.first_errors[0] == "mem.json row 2: field 'chosen': expected a string, got None"
    assert len(result.first_errors) == 4


def test_all_rows_bad_is_an_error_even_when_skipping():
    with pytest.raises(DataError, match=r"mem\.json: all 2 rows are bad \(empty response: 2\)"):
        normalize(RowSource("mem.json", [standard(chosen="")] * 2), on_bad_row="skip")


def test_unknown_format_lists_the_keys_and_what_each_format_expects():
    source = RowSource("odd.jsonl", [{"instruction": "x", "output": "y"}], line_numbers=[1])
    with pytest.raises(DataError) as info:
        normalize(source)
    message = str(info.value)
    assert message.startswith("odd.jsonl: cannot tell the row format from its keys ['instruction', 'output']")
    for expectation in (
        "standard: prompt, chosen, rejected",
        "implicit: chosen, rejected",
        "sharegpt: conversations",
    ):
        assert expectation in message


def test_format_is_detected_once_and_an_override_wins():
    implicit_row = {"chosen": "Why? Because.", "rejected": "Why? No."}
    with pytest.raises(DataError, match="mixed.json row 2: field 'prompt': missing"):
        normalize(RowSource("mixed.json", [standard(), implicit_row]))
    # Detection alone would say "standard"; the override reads the same row as implicit.
    overridden = normalize(RowSource("x.json", [implicit_row | {"prompt": "unused"}]), fmt="implicit")
    assert overridden.format == "implicit"
    assert overridden.pairs == [Pair("Why?", " Because.", " No.")]


def test_columns_without_a_mapping_or_known_columns():
    with pytest.raises(DataError, match=r"format 'columns' needs a mapping"):
        normalize(RowSource("x.json", [standard()]), fmt="columns")


def test_bad_arguments():
    with pytest.raises(DataError, match="unknown data format 'alpaca'"):
        to_pair(standard(), "alpaca")
    with pytest.raises(ValueError, match="on_bad_row"):
        normalize(RowSource("x.json", [standard()]), on_bad_row="ignore")
    with pytest.raises(DataError, match="x.json: no rows"):
        normalize(RowSource("x.json", []))
