"""The tokenized-data cache's key: every input that can change the tokenized rows or the summary
(``fingerprint``), where entries live (``cache_root``), and what identifies each source and tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets

from orpo.config import DataConfig, DataSource
from orpo.data.sources import RowSource, load_rows
from orpo.data.templates import ChatTemplate
from orpo.data.tokenize import SpecialTokens

PIPELINE_VERSION = 4  # bump when rendering, tokenization or truncation changes its output


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("ORPO_CACHE") or "~/.cache/orpo"
    return Path(root).expanduser()


def data_identity(spec: str, split: str, subset: str | None) -> tuple[str, RowSource | None]:
    """What the cache key knows of a data source, and its rows when they had to be read for it.

    A local file is its sha256 (no parsing needed, so a cache hit skips reading it). Hub data is
    its name, split, subset and a hash of its rows as loaded.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return f"file:sha256:{_sha256_file(path)}", None
    rows = load_rows(spec, split, subset)
    return f"hub:{spec}:{split}:{subset}:{rows_digest(rows.rows)}", rows


def rows_digest(rows: Sequence[Any]) -> str:
    """sha256 of rows' content (hub data, rows given in Python; an unreadable row by its repr)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """Hash of the full tokenizer: vocabulary, merges, normalizer, added and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = SpecialTokens.of(tokenizer)
    h.update(json.dumps([dict(tokenizer.special_tokens_map), asdict(special)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(cfg: DataConfig, tokenizer, template: ChatTemplate, seed: int,
                train: Sequence[tuple[str, DataSource]], eval_id: str | None) -> str:
    """The cache key: every input that can change the tokenized rows (and the summary's checks).

    ``train``: each training source's identity (``data_identity``) and settings, in mixture order.
    """
    mixture = [{"data": ident, **s.model_dump(mode="json", exclude={"path"})} for ident, s in train]
    sampled = cfg.eval_fraction > 0 or any(m["weight"] or m["max_samples"] for m in mixture)
    key = {
        "version": PIPELINE_VERSION,
        "train": mixture,
        "eval": eval_id,
        "tokenizer": tokenizer_identity(tokenizer),
        "template": [template.name if template.is_plain else None, template.jinja],
        "format": cfg.format,
        "columns": cfg.columns.model_dump() if cfg.columns is not None else None,
        "on_bad_row": cfg.on_bad_row,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "min_response_tokens": cfg.min_response_tokens,
        "max_samples": cfg.max_samples,
        "eval_fraction": cfg.eval_fraction,
        "seed": seed if sampled else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No progress bars for the cache's quick saves and loads (they are noise, not progress)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
