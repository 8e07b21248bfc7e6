"""Hostile preference data for the tests: Hypothesis strategies, file writers, and the one check.

The promise every test here checks (docs/reliability.md): whatever the file holds, the pipeline
returns only valid pairs (each response at least ``min_response_tokens`` tokens, each sequence at
most ``max_length``, chosen and rejected different, a finite loss) with every dropped row counted
by reason, or raises one ``DataError`` that names the file; never another exception.

Profiles: ``ci`` (the default) is derandomized with no example database, so a CI run is the same
every time; ``HYPOTHESIS_PROFILE=thorough`` runs 20x the examples with fresh randomness.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from orpo.config import DataConfig
from orpo.data import DataError, PaddedLayout, prepare_data
from orpo.data.pipeline import PreparedData
from orpo.loss import orpo_loss, token_logps_from_logits

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
           HealthCheck.large_base_example]
# deadline: generous for a busy 2-core CI machine, but a pathological (quadratic) case still fails
settings.register_profile("ci", derandomize=True, database=None, deadline=timedelta(seconds=20),
                          suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("thorough", deadline=timedelta(seconds=60), suppress_health_check=_HEALTH)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """``max_examples`` for a test: ``n`` in the default run, 20x under the thorough profile."""
    return n * 20 if PROFILE == "thorough" else n


MAX_LENGTH = 48
KINDS = [f"{ext}{gz}" for ext in ("jsonl", "json", "csv", "parquet") for gz in ("", ".gz")]

# ---------------------------------------------------------------------------------------------
# Text

# Pieces a template, a tokenizer or a transcript parser could mistake for structure.
TRAPS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "\n\nHuman:", "\n\nAssistant:",
         "Human:", "{{ x }}", "{% if %}", "\r\n", "\r", "\t", "\x00", "\ufeff", "\u200b", "\u2028", "\u202e",
         "\u200f", " ", "\\", '"', ",", "'", "e\u0301", "\U0001f600", "\U0001f468\u200d\U0001f469", "שלום",
         "مرحبا", "\x7f", "\x1b[31m"]
_UNICODE = st.characters(categories=["Mn", "Me", "Cc", "Cf", "Zs", "Zl", "Zp", "So", "Lo", "Lu", "Ll", "Nd", "Po"])


_PIECE = st.one_of(st.sampled_from(TRAPS), st.text(_UNICODE, max_size=6), st.text("ab yz.", min_size=1, max_size=8))
# Unicode soup: combining marks, RTL, emoji, NUL and control characters, template look-alikes
HOSTILE_TEXT = st.lists(_PIECE, max_size=8).map("".join)
# hostile text that is still a valid field: something besides whitespace
VISIBLE_TEXT = st.tuples(HOSTILE_TEXT, st.text("abcxyz", min_size=1, max_size=6), HOSTILE_TEXT).map("".join)
WHITESPACE = st.text(" \t\r\n\u00a0\u2003\u3000", max_size=5)
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)
_BAD = {
    "empty": st.just(""),
    "whitespace": WHITESPACE,
    "surrogate": st.tuples(VISIBLE_TEXT, st.characters(categories=["Cs"])).map("".join),
    "junk": JUNK,  # wrong types and nested junk
}
# mostly a valid text, sometimes empty, whitespace-only, a lone surrogate, a wrong type or junk
FIELD = st.sampled_from(["ok"] * 12 + list(_BAD)).flatmap(lambda k: VISIBLE_TEXT if k == "ok" else _BAD[k])


# ---------------------------------------------------------------------------------------------
# Rows, one strategy per format; `strict=True` gives rows that are always valid


def _text(strict: bool) -> st.SearchStrategy[Any]:
    return VISIBLE_TEXT if strict else FIELD


_ROLE_OK = {"user": st.just("user"), "assistant": st.just("assistant"), "system": st.just("system")}
_ROLE_ANY = {
    "user": st.sampled_from(["user"] * 12 + ["system", "assistant", "bot", ""]),
    "assistant": st.sampled_from(["assistant"] * 12 + ["user", "gpt"]),
    "system": st.just("system"),
}


def _message(role: str, strict: bool) -> st.SearchStrategy[Any]:
    msg = st.fixed_dictionaries({"role": (_ROLE_OK if strict else _ROLE_ANY)[role], "content": _text(strict)})
    if strict:
        return msg
    return st.sampled_from(["ok"] * 12 + ["junk", "no content"]).flatmap(
        lambda k: msg if k == "ok" else JUNK if k == "junk" else st.fixed_dictionaries({"role": FIELD}))


def _maybe_same(draw, strict: bool) -> tuple[Any, Any]:
    c = draw(_text(strict))
    r = draw(_text(strict))
    if strict:
        r = c + "!" if c == r else r
    elif draw(st.integers(0, 5)) == 0:
        r = c  # chosen identical to rejected
    return c, r


@st.composite
def standard_rows(draw, strict: bool = False) -> dict[str, Any]:
    chosen, rejected = _maybe_same(draw, strict)
    row = {"prompt": draw(_text(strict)), "chosen": chosen, "rejected": rejected}
    if draw(st.booleans()):
        row["extra"] = draw(JUNK)
    return row


@st.composite
def implicit_rows(draw, strict: bool = False) -> dict[str, Any]:
    hh = draw(st.booleans())
    prompt = f"\n\nHuman: {draw(VISIBLE_TEXT)}\n\nAssistant:" if hh else draw(VISIBLE_TEXT) + " "
    head = " " if hh else ""
    chosen, rejected = _maybe_same(draw, True)
    if strict:
        return {"chosen": prompt + head + "A" + chosen, "rejected": prompt + head + "B" + rejected}
    if draw(st.integers(0, 5)) == 0:
        rejected = chosen
    c = prompt + head + chosen if draw(st.integers(0, 4)) else draw(FIELD)
    return {"chosen": c, "rejected": prompt + head + rejected}


@st.composite
def conversational_rows(draw, strict: bool = False) -> dict[str, Any]:
    system = draw(st.lists(_message("system", strict), max_size=1))
    prompt = [*system, *draw(st.lists(_message("user", strict), min_size=1, max_size=3))]
    chosen, rejected = _maybe_same(draw, strict)
    roles = (_ROLE_OK if strict else _ROLE_ANY)["assistant"]
    shape = draw(st.sampled_from(["prompt", "full", "parts"]))
    if shape == "prompt":
        return {"prompt": prompt, "chosen": [{"role": draw(roles), "content": chosen}],
                "rejected": [{"role": draw(roles), "content": rejected}]}
    if shape == "full":
        return {"chosen": [*prompt, {"role": draw(roles), "content": chosen}],
                "rejected": [*prompt, {"role": draw(roles), "content": rejected}]}

    def parts(m: Any) -> Any:
        return {**m, "content": [{"type": "text", "text": m.get("content")}]} if isinstance(m, dict) else m

    last_rejected = {"role": draw(roles), "content": rejected}
    return {"chosen_messages": [*map(parts, prompt), parts({"role": draw(roles), "content": chosen})],
            # a plain string content beside parts is allowed too (Arrow cannot mix them in one column)
            "rejected_messages": [*map(parts, prompt), parts(last_rejected) if strict else last_rejected]}


_SHAREGPT_OK = {"human": st.just("human"), "gpt": st.just("gpt")}
_SHAREGPT_ANY = {"human": st.sampled_from(["human"] * 12 + ["user", "gpt", "robot"]),
                 "gpt": st.sampled_from(["gpt"] * 12 + ["assistant", "human"])}


@st.composite
def sharegpt_rows(draw, strict: bool = False) -> dict[str, Any]:
    roles = _SHAREGPT_OK if strict else _SHAREGPT_ANY
    turn = st.fixed_dictionaries({"from": roles["human"], "value": _text(strict)})
    if not strict:
        turn = st.sampled_from(["ok"] * 12 + ["junk"]).flatmap(lambda k, t=turn: t if k == "ok" else JUNK)
    convo = draw(st.lists(turn, min_size=1, max_size=3))
    chosen, rejected = _maybe_same(draw, strict)
    row = {"conversations": convo, "chosen": {"from": draw(roles["gpt"]), "value": chosen},
           "rejected": {"from": draw(roles["gpt"]), "value": rejected}}
    if draw(st.booleans()):
        row["system"] = draw(_text(strict))
    return row


@st.composite
def columns_rows(draw, strict: bool = False) -> dict[str, Any]:
    """The built-in StackExchange mapping (question, response_j, response_k)."""
    chosen, rejected = _maybe_same(draw, strict)
    return {"question": draw(_text(strict)), "response_j": chosen, "response_k": rejected}


ROWS = {"standard": standard_rows, "implicit": implicit_rows, "conversational": conversational_rows,
        "sharegpt": sharegpt_rows, "columns": columns_rows}

# ---------------------------------------------------------------------------------------------
# Files


def encode_file(kind: str, rows: list[dict[str, Any]]) -> bytes:
    """Rows as the bytes of a ``kind`` file (``jsonl``, ``csv.gz``, ...), written without our reader's code.

    JSON keeps lone surrogates as ``\\udXXX`` escapes; CSV and Parquet cannot hold them (their
    writers need valid UTF-8), so there they become U+FFFD. CSV holds only text: other values are
    written as JSON. A Parquet column whose values Arrow cannot give one type is written as JSON
    text, so the file still has a schema, just not the one the format expects.
    """
    ext = kind.removesuffix(".gz")
    if ext == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif ext == "json":
        data = json.dumps(rows).encode()
    elif ext == "csv":
        names = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow([_utf8(n) for n in names])
        writer.writerows([[_csv_cell(r.get(n, "")) for n in names] for r in rows])
        data = out.getvalue().encode()
    elif ext == "parquet":
        data = _parquet([_utf8_deep(r) for r in rows])
    else:
        raise AssertionError(kind)
    return gzip.compress(data, mtime=0) if kind.endswith(".gz") else data


def _utf8(text: str) -> str:
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def _utf8_deep(value: Any) -> Any:
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, list):
        return [_utf8_deep(v) for v in value]
    if isinstance(value, dict):
        return {_utf8(k): _utf8_deep(v) for k, v in value.items()}
    return value


def _csv_cell(value: Any) -> str:
    return _utf8(value) if isinstance(value, str) else json.dumps(_utf8_deep(value))


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {name: _parquet_column([r.get(name) for r in rows]) for name in names}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns) if columns else pa.table({"empty": pa.array([None] * len(rows))}), sink)
    return sink.getvalue().to_pybytes()


def _parquet_column(values: list[Any]) -> pa.Array:
    """Arrow's own type for the values if it has one Parquet can store, else JSON text."""
    try:
        array = pa.array(values)
        pq.write_table(pa.table({"probe": array}), pa.BufferOutputStream())
        return array
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def write(folder: Path, kind: str, data: bytes) -> Path:
    path = folder / f"{uuid.uuid4().hex[:10]}.{kind}"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# The check


def data_config(path: Path, **overrides: Any) -> DataConfig:
    return DataConfig(train=str(path), max_length=MAX_LENGTH, **overrides)


def prepare(cfg: DataConfig, tokenizer, template: str = "none", use_cache: bool = False) -> PreparedData | DataError:
    """The real pipeline; a DataError is returned (after checking it is well formed), anything else raises."""
    try:
        return prepare_data(cfg, tokenizer, chat_template=template, use_cache=use_cache)
    except DataError as err:
        check_error(err, cfg.train, cfg.eval)
        return err


def check_error(err: DataError, *sources: str | None) -> None:
    """One line, naming the file, and short enough to read (no megabyte echo of a field)."""
    msg = str(err)
    assert msg.startswith(tuple(s for s in sources if s)), msg
    assert "\n" not in msg and len(msg) < 2000, msg
    assert msg.encode("utf-8")  # printable to a UTF-8 stderr: no lone surrogate echoed raw


_ROW_ERROR = re.compile(r" (line|row) (\d+): ")


def row_error(err: DataError) -> tuple[int, str | None] | None:
    """(line or row number, field or None) of a row-level error; None for a file-level one."""
    m = _ROW_ERROR.search(str(err))
    if m is None:
        return None
    field = re.search(r"field '([^']*)'", str(err))
    return int(m.group(2)), field.group(1) if field else None


_LOSS_MODEL: list[Any] = []


def loss_model():
    """A tiny random Llama over the stories260K vocabulary, built once (to check the loss is finite)."""
    if not _LOSS_MODEL:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_LENGTH)
        _LOSS_MODEL.append(LlamaForCausalLM(cfg).eval())
    return _LOSS_MODEL[0]


def check_prepared(prepared: PreparedData, cfg: DataConfig, tokenizer) -> None:
    """Every kept pair is valid, every dropped one is counted, and the loss over them is finite."""
    s = prepared.summary
    sets = [d for d in (prepared.train, prepared.eval) if d is not None]
    assert len(prepared.train) > 0
    bad_rows = sum(n for reason, n in s.dropped.items() if reason.startswith("bad row: "))
    if cfg.max_samples is None:
        assert s.rows_read == s.pairs + bad_rows, s
    assert s.pairs == s.kept + s.num_dropped - bad_rows, s
    assert s.kept == s.train_size + s.eval_size == sum(len(d) for d in sets), s
    for lengths in s.lengths.values():
        assert 0 <= lengths.p50 <= lengths.p90 <= lengths.p99 <= lengths.max
    vocab = len(tokenizer)
    rows = [r for d in sets for r in d]
    for r in rows:
        for side in ("chosen", "rejected"):
            ids, prompt_len = r[f"{side}_input_ids"], r[f"{side}_prompt_len"]
            assert len(ids) <= cfg.max_length
            assert len(ids) - prompt_len >= cfg.min_response_tokens
            assert 1 <= prompt_len and all(0 <= t < vocab for t in ids)
        assert r["chosen_input_ids"] != r["rejected_input_ids"]
    batch = PaddedLayout(pad_token_id=0)(rows[:16])
    with torch.no_grad():
        logits = loss_model()(**batch.inputs).logits
    out = orpo_loss(token_logps_from_logits(logits, batch.labels), batch.segment_ids, batch.response_mask,
                    batch.num_pairs)
    assert all(torch.isfinite(v).all() for v in out.metrics().values()), out
