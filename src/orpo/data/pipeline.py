"""``prepare_data``: read -> normalize -> split -> render + tokenize -> drop -> summary, cached on disk.

The cache key (``fingerprint``) covers everything that can change the tokenized rows: the data
bytes, the tokenizer's full serialization, the template text, the format settings, every length
limit, ``max_samples``, the eval settings and seed, and ``PIPELINE_VERSION``. A changed input is
a new key, never a stale hit. Entries are written to a temporary folder and renamed into place,
so an interrupted run never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from orpo.config import DataConfig
from orpo.data.formats import NormalizedRows, Pair, normalize
from orpo.data.sources import DataError, RowSource, load_rows
from orpo.data.templates import ChatTemplate, resolve_chat_template
from orpo.data.tokenize import (
    OUTPUT_COLUMNS,
    STAT_COLUMNS,
    Limits,
    SpecialTokens,
    pair_columns,
    tokenize_batch,
)

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 3  # bump when rendering, tokenization or truncation changes its output
LENGTH_KEYS = ("prompt", "chosen", "rejected", "sequence")
PERCENTILES = (50, 90, 99)


# ------------------------------------------------------------------------------ results


@dataclass
class LengthStats:
    """Untruncated token lengths: percentiles are observed values (``method="higher"``)."""

    p50: int
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, values: np.ndarray) -> LengthStats:
        if values.size == 0:
            return cls(0, 0, 0, 0)
        p50, p90, p99 = (int(np.percentile(values, q, method="higher")) for q in PERCENTILES)
        return cls(p50=p50, p90=p90, p99=p99, max=int(values.max()))


@dataclass
class DataSummary:
    """What happened to the data, for the user: counts, drops by reason, lengths, truncation."""

    source: str
    eval_source: str | None
    format: str
    template: str
    max_length: int
    prompt_budget: int | None  # None: adaptive (see tokenize.py)
    rows_read: int
    pairs: int  # valid pairs (after bad rows and max_samples), before tokenization
    kept: int
    train_size: int
    eval_size: int
    dropped: dict[str, int]  # reason -> count; bad rows too ("bad row: <kind>")
    truncated: int  # kept pairs with a cut prompt or response
    lengths: dict[str, LengthStats]  # prompt / chosen / rejected response / longest sequence
    first_errors: list[str] = field(default_factory=list)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSummary:
        d = dict(d)
        d["lengths"] = {k: LengthStats(**v) for k, v in d["lengths"].items()}
        return cls(**d)

    def render(self) -> str:
        """One screen of text (rich tables, no colour codes)."""
        from rich.console import Console
        from rich.table import Table

        counts = Table(title="Preference data", show_header=False, title_justify="left")
        counts.add_column(style="bold")
        counts.add_column()
        src = self.source + (f"  (eval: {self.eval_source})" if self.eval_source else "")
        counts.add_row("source", src)
        counts.add_row("format / template", f"{self.format} / {self.template}")
        counts.add_row("rows read", str(self.rows_read))
        counts.add_row("pairs", str(self.pairs))
        counts.add_row("kept", f"{self.kept}  (train {self.train_size}, eval {self.eval_size})")
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        counts.add_row("dropped", f"{self.num_dropped}" + (f"  ({drops})" if drops else ""))
        counts.add_row(
            "truncated", f"{self.truncated}  (max_length {self.max_length}, prompt budget "
            f"{self.prompt_budget if self.prompt_budget is not None else 'auto: >= max_length/2'})"
        )
        for err in self.first_errors:
            counts.add_row("bad row", err)

        lengths = Table(title="Token lengths before truncation", title_justify="left")
        lengths.add_column("")
        for name in ("p50", "p90", "p99", "max"):
            lengths.add_column(name, justify="right")
        labels = {"prompt": "prompt", "chosen": "chosen response", "rejected": "rejected response",
                  "sequence": "longest sequence"}
        for key in LENGTH_KEYS:
            s = self.lengths[key]
            lengths.add_row(labels[key], str(s.p50), str(s.p90), str(s.p99), str(s.max))

        out = io.StringIO()
        console = Console(file=out, width=110, color_system=None, force_terminal=False)
        console.print(counts)
        console.print(lengths)
        return out.getvalue().rstrip()


@dataclass
class PreparedData:
    """Tokenized train/eval sets (columns: ``OUTPUT_COLUMNS``) and how they were made."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    summary: DataSummary
    template: ChatTemplate
    fingerprint: str
    cache_path: Path | None = None
    from_cache: bool = False


# ------------------------------------------------------------------------------ the pipeline


def prepare_data(
    cfg: DataConfig,
    tokenizer,
    chat_template: str | None = None,
    seed: int = 42,
    console=None,
    use_cache: bool = True,
) -> PreparedData:
    """Everything between a data setting and tokenized rows; see the module doc."""
    template = resolve_chat_template(chat_template, tokenizer)
    train_id, train_rows = data_identity(cfg.train, cfg.train_split, cfg.subset)
    eval_id, eval_rows = (None, None)
    if cfg.eval is not None:
        eval_id, eval_rows = data_identity(cfg.eval, cfg.eval_split, cfg.subset)
    fp = fingerprint(cfg, tokenizer, template, seed, train_id, eval_id)
    cache = cache_root(cfg) / fp if use_cache else None

    if cache is not None and cache.is_dir():
        hit = _load_cached(cache, cfg, template, fp)
        if hit is not None:
            _say(console, f"tokenized data: reusing cache {cache}")
            return hit

    prepared = _build(cfg, tokenizer, template, seed, fp, train_rows, eval_rows)
    if cache is not None:
        try:
            _save(prepared, cache)
        except OSError as err:
            logger.warning("could not write the data cache %s: %s", cache, err)
            return prepared
        _say(console, f"tokenized data: cached at {cache}")
        hit = _load_cached(cache, cfg, template, fp)  # memory-mapped, as every later run gets it
        if hit is not None:
            hit.from_cache = False
            return hit
    return prepared


def _build(cfg: DataConfig, tokenizer, template: ChatTemplate, seed: int, fp: str,
           train_rows: RowSource | None, eval_rows: RowSource | None) -> PreparedData:
    columns = cfg.columns.model_dump() if cfg.columns is not None else None
    train_norm = _normalize(train_rows or load_rows(cfg.train, cfg.train_split, cfg.subset), cfg, columns)
    pairs = train_norm.pairs[: cfg.max_samples] if cfg.max_samples else train_norm.pairs
    norms = [train_norm]
    if cfg.eval is not None:
        eval_norm = _normalize(eval_rows or load_rows(cfg.eval, cfg.eval_split, cfg.subset), cfg, columns)
        norms.append(eval_norm)
        train_pairs, eval_pairs = pairs, eval_norm.pairs
    elif cfg.eval_fraction > 0:
        try:
            train_pairs, eval_pairs = split_eval(pairs, cfg.eval_fraction, seed)
        except DataError as err:
            raise DataError(f"{cfg.train}: {err}") from err
    else:
        train_pairs, eval_pairs = pairs, None

    limits = Limits.from_config(cfg)
    train_tok = tokenize_pairs(train_pairs, template, tokenizer, limits, cfg.num_proc, f"{fp}-train")
    eval_tok = None
    if eval_pairs is not None:
        eval_tok = tokenize_pairs(eval_pairs, template, tokenizer, limits, cfg.num_proc, f"{fp}-eval")

    tokenized = [train_tok] + ([eval_tok] if eval_tok is not None else [])
    stats = {c: np.concatenate([np.asarray(d[c]) for d in tokenized]) for c in STAT_COLUMNS}
    train, train_drops = _drop(train_tok)
    evalset, eval_drops = _drop(eval_tok) if eval_tok is not None else (None, {})
    # an empty set would hang the training loop or give NaN metrics: say why now, with the drops
    if len(train) == 0:
        raise DataError(f"{cfg.train}: no training pair left after tokenization{_why(train_drops, limits)}")
    if evalset is not None and len(evalset) == 0:
        eval_name = cfg.eval or f"the eval_fraction split of {cfg.train}"
        raise DataError(f"{eval_name}: no eval pair left after tokenization{_why(eval_drops, limits)}")

    dropped: dict[str, int] = {}
    for norm in norms:
        for kind, n in norm.skipped.items():
            dropped[f"bad row: {kind}"] = dropped.get(f"bad row: {kind}", 0) + n
    for reason, n in [*train_drops.items(), *eval_drops.items()]:
        dropped[reason] = dropped.get(reason, 0) + n
    kept = stats["drop_reason"] == ""
    summary = DataSummary(
        source=cfg.train,
        eval_source=cfg.eval,
        format=train_norm.format,
        template=template.name,
        max_length=limits.max_length,
        prompt_budget=limits.prompt_budget,
        rows_read=sum(n.rows_read for n in norms),
        pairs=len(train_pairs) + (len(eval_pairs) if eval_pairs is not None else 0),
        kept=int(kept.sum()),
        train_size=len(train),
        eval_size=len(evalset) if evalset is not None else 0,
        dropped=dropped,
        truncated=int((stats["truncated"].astype(bool) & kept).sum()),
        lengths=_length_stats(stats),
        first_errors=[e for n in norms for e in n.first_errors][:5],
    )
    return PreparedData(train=train, eval=evalset, summary=summary, template=template, fingerprint=fp)


def _why(drops: dict[str, int], limits: Limits) -> str:
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(drops.items(), key=lambda kv: -kv[1]))
    return (f" (dropped {counts}; data.max_length is {limits.max_length}, data.min_response_tokens "
            f"{limits.min_response_tokens})") if counts else ""


def _normalize(source: RowSource, cfg: DataConfig, columns: dict[str, str] | None) -> NormalizedRows:
    return normalize(source, fmt=cfg.format, columns=columns, on_bad_row=cfg.on_bad_row)


def split_eval(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``fraction`` of the pairs (at least one) with a fixed seed; both keep file order."""
    n = len(pairs)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"eval_fraction {fraction} of {n} pairs leaves no training pairs")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return [p for p, h in zip(pairs, held, strict=True) if not h], [p for p, h in zip(pairs, held, strict=True) if h]


def tokenize_pairs(pairs: list[Pair], template: ChatTemplate, tokenizer, limits: Limits,
                   num_proc: int | None = None, fingerprint: str | None = None) -> datasets.Dataset:
    """Render + tokenize with ``Dataset.map`` (batched; ``num_proc`` workers): token + stat columns."""
    ds = datasets.Dataset.from_dict(pair_columns(pairs))
    return ds.map(
        tokenize_batch,
        batched=True,
        batch_size=1000,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > num_proc else None,
        remove_columns=ds.column_names,
        fn_kwargs={"template": template, "tokenizer": tokenizer, "limits": limits},
        new_fingerprint=fingerprint,  # skip hashing the tokenizer; our own cache key covers it
        desc="tokenizing",
    )


def _drop(ds: datasets.Dataset) -> tuple[datasets.Dataset, dict[str, int]]:
    """Remove dropped pairs and the statistics columns -> (dataset, reason -> count)."""
    reasons = np.asarray(ds["drop_reason"])
    keep = np.flatnonzero(reasons == "")
    counts = {str(r): int(n) for r, n in zip(*np.unique(reasons[reasons != ""], return_counts=True), strict=True)}
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds.remove_columns(list(STAT_COLUMNS)), counts


def _length_stats(stats: dict[str, np.ndarray]) -> dict[str, LengthStats]:
    prompt, chosen, rejected = stats["prompt_tokens"], stats["chosen_tokens"], stats["rejected_tokens"]
    return {
        "prompt": LengthStats.of(prompt),
        "chosen": LengthStats.of(chosen),
        "rejected": LengthStats.of(rejected),
        "sequence": LengthStats.of(prompt + np.maximum(chosen, rejected)),
    }


# ------------------------------------------------------------------------------ cache


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
    h = hashlib.sha256()
    for row in rows.rows:
        h.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return f"hub:{spec}:{split}:{subset}:{h.hexdigest()}", rows


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
                train_id: str, eval_id: str | None) -> str:
    """The cache key: every input that can change the tokenized rows."""
    key = {
        "version": PIPELINE_VERSION,
        "train": train_id,
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
        "seed": seed if cfg.eval_fraction > 0 else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No progress bars for the cache's quick saves and loads (they are noise, not progress)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _save(prepared: PreparedData, final: Path) -> None:
    """Write train/, eval/ and summary.json to a temporary folder, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet_progress():
            prepared.train.save_to_disk(str(tmp / "train"))
            if prepared.eval is not None:
                prepared.eval.save_to_disk(str(tmp / "eval"))
        meta = {"fingerprint": prepared.fingerprint, "template": asdict(prepared.template),
                "summary": prepared.summary.to_dict()}
        (tmp / "summary.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # anything but "another process wrote it first" is a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared.cache_path = final


def _load_cached(path: Path, cfg: DataConfig, template: ChatTemplate, fp: str) -> PreparedData | None:
    try:
        meta = json.loads((path / "summary.json").read_text())
        with _quiet_progress():
            train = datasets.load_from_disk(str(path / "train"))
            evalset = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
        summary = DataSummary.from_dict(meta["summary"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, err)
        shutil.rmtree(path, ignore_errors=True)
        return None
    # the key holds contents, not names: show the names this run used
    summary.source, summary.eval_source, summary.template = cfg.train, cfg.eval, template.name
    return PreparedData(train=train, eval=evalset, summary=summary, template=template, fingerprint=fp,
                        cache_path=path, from_cache=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message)
    logger.info(message)


__all__ = [
    "OUTPUT_COLUMNS",
    "DataSummary",
    "LengthStats",
    "PreparedData",
    "cache_root",
    "fingerprint",
    "prepare_data",
    "split_eval",
    "tokenize_pairs",
]
