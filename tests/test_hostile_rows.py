"""Generated hostile rows in every format and every file kind, through the real pipeline.

Whatever the rows hold, ``prepare_data`` (stories260K tokenizer) gives only valid pairs with every
dropped row counted, or one DataError naming the file (and, for a bad row, its line or row and
field): the checks live in ``hostile.check_prepared`` / ``hostile.check_error``.
"""

from __future__ import annotations

import gzip

import pytest
from hostile import (
    KINDS,
    MAX_LENGTH,
    ROWS,
    VISIBLE_TEXT,
    check_prepared,
    data_config,
    encode_file,
    examples,
    prepare,
    row_error,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo.data import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

NESTED = {"conversational", "sharegpt"}  # message lists: CSV cannot hold them
TEMPLATES = ["none", "chatml", "llama3", "zephyr"]


def _kinds(fmt: str) -> list[str]:
    return [k for k in KINDS if not (fmt in NESTED and k.startswith("csv"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile-rows")


@pytest.mark.parametrize("fmt", list(ROWS))
def test_any_rows_give_valid_pairs_or_one_named_error(fmt, folder, stories_tokenizer):
    @settings(max_examples=examples(25))
    @given(rows=st.lists(ROWS[fmt](), min_size=1, max_size=6), kind=st.sampled_from(KINDS),
           skip=st.booleans(), template=st.sampled_from(TEMPLATES), min_response=st.sampled_from([1, 3]),
           eval_fraction=st.sampled_from([0.0, 0.0, 0.4]))
    def check(rows, kind, skip, template, min_response, eval_fraction):
        path = write(folder, kind, encode_file(kind, rows))
        cfg = data_config(path, on_bad_row="skip" if skip else "error", min_response_tokens=min_response,
                          eval_fraction=eval_fraction)
        result = prepare(cfg, stories_tokenizer, template)
        if not isinstance(result, DataError):
            check_prepared(result, cfg, stories_tokenizer)
        elif not skip and row_error(result) is not None:
            assert "field '" in str(result) or "malformed JSON" in str(result) or "fields, but" in str(result)

    check()


@pytest.mark.parametrize("fmt", list(ROWS))
def test_valid_hostile_unicode_is_kept_and_a_bom_or_crlf_changes_nothing(fmt, folder, stories_tokenizer):
    """Rows that are valid, however strange their text, all become pairs; a BOM or CRLF line ends
    (what Windows tools write) give exactly the same tokens."""

    @settings(max_examples=examples(15))
    @given(rows=st.lists(ROWS[fmt](strict=True), min_size=1, max_size=5), kind=st.sampled_from(_kinds(fmt)),
           template=st.sampled_from(TEMPLATES))
    def check(rows, kind, template):
        data = encode_file(kind.removesuffix(".gz"), rows)
        cfg = data_config(write(folder, kind, _gz(kind, data)))
        plain = prepare(cfg, stories_tokenizer, template)
        if isinstance(plain, DataError):  # every pair identical once cut to max_length: said, not hidden
            assert "no training pair left" in str(plain) and "identical_tokens" in str(plain), str(plain)
        else:
            assert plain.summary.rows_read == plain.summary.pairs == len(rows)
            check_prepared(plain, cfg, stories_tokenizer)
        variants = [] if kind.startswith("parquet") else [b"\xef\xbb\xbf" + data]
        if kind.startswith("json"):
            variants.append(data.replace(b"\n", b"\r\n"))
        for variant in variants:
            other = prepare(data_config(write(folder, kind, _gz(kind, variant))), stories_tokenizer, template)
            if isinstance(plain, DataError):
                assert str(other).split(": ", 1)[1] == str(plain).split(": ", 1)[1]
            else:
                assert not isinstance(other, DataError), other
                assert other.train[:] == plain.train[:]

    check()


@pytest.mark.parametrize("fmt", ["standard", "columns", "sharegpt", "conversational"])
def test_one_bad_field_is_named_by_row_and_field_or_skipped_and_counted(fmt, folder, stories_tokenizer):
    """Plant one bad value (wrong type, empty, whitespace-only, a lone surrogate) in one field of
    one row among valid rows: ``error`` names exactly that row and field; ``skip`` drops exactly it."""

    @settings(max_examples=examples(25))
    @given(data=st.data(), kind=st.sampled_from(_kinds(fmt)), n=st.integers(1, 5))
    def check(data, kind, n):
        rows = [data.draw(ROWS[fmt](strict=True)) for _ in range(n)]
        bad_at = data.draw(st.integers(0, n - 1))
        value = data.draw(st.sampled_from(_bad_values(kind)))
        fields = _plant(rows[bad_at], fmt, value)
        path = write(folder, kind, encode_file(kind, rows))
        err = prepare(data_config(path), stories_tokenizer)
        assert isinstance(err, DataError), f"row {bad_at + 1} with {fields[0]} = {value!r} was accepted"
        where = row_error(err)
        assert where is not None and where[0] == bad_at + 1, str(err)
        assert where[1] is not None and where[1].startswith(fields), str(err)  # the field, or a part of it

        if n > 1:
            skipped = prepare(data_config(path, on_bad_row="skip"), stories_tokenizer)
            # the n - 1 good pairs may all be identical once truncated, or, when the bad value sits in the
            # first row, the format detected from it may fit none of the others
            if isinstance(skipped, DataError):
                assert "no training pair left" in str(skipped) or "rows are bad" in str(skipped), str(skipped)
                return
            assert skipped.summary.pairs == n - 1
            assert sum(v for k, v in skipped.summary.dropped.items() if k.startswith("bad row")) == 1
            assert skipped.summary.first_errors[0] == str(err)

    check()


def test_prompts_far_longer_than_max_length_are_cut_never_the_response(folder, stories_tokenizer):
    @settings(max_examples=examples(8))
    @given(prompt=VISIBLE_TEXT, repeat=st.integers(200, 3000), response=VISIBLE_TEXT,
           max_prompt=st.sampled_from([None, 8, MAX_LENGTH - 1]))
    def check(prompt, repeat, response, max_prompt):
        rows = [{"prompt": prompt * repeat, "chosen": response, "rejected": response + " no"}]
        cfg = data_config(write(folder, "jsonl", encode_file("jsonl", rows)), max_prompt_length=max_prompt)
        result = prepare(cfg, stories_tokenizer)
        if isinstance(result, DataError):  # a fixed budget of max_length - 1 leaves no room: a named drop
            assert max_prompt == MAX_LENGTH - 1 or "identical_tokens" in str(result), str(result)
            return
        check_prepared(result, cfg, stories_tokenizer)
        assert result.summary.truncated == 1 and result.summary.lengths["prompt"].max > MAX_LENGTH

    check()


def test_megabyte_responses(folder, stories_tokenizer):
    """A 1 MiB response (2**20 characters of hostile text) in gzipped CSV, whose reader refused
    fields over 128 KiB; JSON Lines and Parquet have no such limit."""
    mib = 2**20
    rows = [{"prompt": "Tell me a story.", "chosen": ("\u05e9\u05dc\u05d5\u05dd e\u0301 \U0001f600 \x00" * mib)[:mib],
             "rejected": "The end."}]
    cfg = data_config(write(folder, "csv.gz", encode_file("csv.gz", rows)))
    result = prepare(cfg, stories_tokenizer)
    assert not isinstance(result, DataError), result
    check_prepared(result, cfg, stories_tokenizer)
    assert result.summary.truncated == 1 and result.summary.lengths["chosen"].max > mib


# ------------------------------------------------------------------------------------------------


def _gz(kind: str, data: bytes) -> bytes:
    return gzip.compress(data, mtime=0) if kind.endswith(".gz") else data


def _bad_values(kind: str) -> list:
    """Values each file kind can carry that are never a valid text field there."""
    always = ["", "   ", "\t\r\n\u3000"]
    if kind.startswith("json"):
        return [*always, None, 7, 1.5, True, ["a"], {"text": "a"}, "ok\ud800"]
    if kind.startswith("parquet"):
        return [*always, None]
    return always  # CSV holds text only


def _plant(row: dict, fmt: str, value) -> tuple[str, ...]:
    """Put ``value`` into one response field of ``row``; returns the field paths an error may name
    (a message's content, or the message itself for an empty one)."""
    if fmt == "standard":
        row["chosen"] = value
        return ("chosen",)
    if fmt == "columns":
        row["response_k"] = value
        return ("response_k",)
    if fmt == "sharegpt":
        row["rejected"]["value"] = value
        return ("rejected.value", "rejected")
    key = "chosen_messages" if "chosen_messages" in row else "chosen"
    message = f"{key}[{len(row[key]) - 1}]"
    last = row[key][-1]
    if isinstance(last["content"], list):
        last["content"][0]["text"] = value
        return (f"{message}.content[0].text", message)
    last["content"] = value
    return (f"{message}.content", message)
