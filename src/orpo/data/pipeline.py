"""``prepare_data``: read -> normalize -> mix -> split -> render + tokenize -> drop -> checks -> summary,
cached on disk.

The cache key (``cache.fingerprint``) covers everything that can change the tokenized rows and the
summary: the data bytes (the content, for rows given in memory), each source's settings and weight,
the tokenizer's full serialization, the template text, the format settings, every length limit,
``max_samples``, the eval settings, the seed when anything is sampled, and ``PIPELINE_VERSION``. A
changed input is a new key, never a stale hit. Pairs and tokens go through a work folder beside the
cache (``stored``, ``tokenized``); entries are written to a temporary folder and renamed into place,
so an interrupted run never leaves a half-written entry that a later run would trust. The summary
itself is ``summary.DataSummary``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import datasets
import numpy as np

from orpo import disk
from orpo.config import ConfigError, DataConfig, DataSource
from orpo.data import stored
from orpo.data.cache import cache_root, data_identity, fingerprint, rows_digest
from orpo.data.checks import Finding, LengthBias, find_faults, leak_markers, prompt_overlap
from orpo.data.formats import NormalizedRows, Pair, normalize
from orpo.data.refs import Refs
from orpo.data.sources import DataError, RowSource, load_rows, rows_from_memory
from orpo.data.summary import DataSummary, LengthStats, length_stats
from orpo.data.templates import ChatTemplate, resolve_chat_template
from orpo.data.tokenize import (
    NO_ROOM_FOR_RESPONSE,
    OUTPUT_COLUMNS,
    STAT_COLUMNS,
    Limits,
)
from orpo.data.tokenized import drop_rows, stat_columns, tokenize_pairs, write_split

logger = logging.getLogger(__name__)


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
    train_data: Any = None,
    eval_data: Any = None,
) -> PreparedData:
    """Everything between a data setting and tokenized rows; see the module doc.

    ``train_data`` / ``eval_data``: rows in memory (a ``datasets.Dataset``, a pandas DataFrame or a
    list of dicts) instead of ``data.train`` / ``data.eval``; they go through the same steps.
    """
    template = resolve_chat_template(chat_template, tokenizer)
    train_specs, eval_spec = source_specs(cfg, train_data, eval_data)
    train_ids = [(spec.identity(), spec.settings) for spec in train_specs]
    eval_id = eval_spec.identity() if eval_spec is not None else None
    fp = fingerprint(cfg, tokenizer, template, seed, train_ids, eval_id)
    cache = cache_root(cfg) / fp if use_cache else None
    names = (_display_name(train_specs), _display_name([eval_spec]) if eval_spec is not None else None)

    if cache is not None and cache.is_dir():
        hit = _load_cached(cache, names, template, fp)
        if hit is not None:
            _say(console, f"tokenized data: reusing cache {cache}")
            return hit

    if cache is None:
        return _build(cfg, tokenizer, template, seed, fp, read_pairs(cfg, train_specs, eval_spec, seed), names)
    # pairs and tokens go to Arrow files beside the cache (not RAM), then into the entry; the folder goes after
    for kind in ("work", "tmp"):
        disk.remove_stale_scratch(cache.parent, kind)
    work: Path | None = cache.parent / disk.scratch_name("work", fp)
    try:
        cast(Path, work).mkdir(parents=True)
    except OSError as err:
        logger.warning("could not write the data cache %s: %s", cache, err)
        work = None
    try:
        read = read_pairs(cfg, train_specs, eval_spec, seed, work_dir=work)
        prepared = _build(cfg, tokenizer, template, seed, fp, read, names, work)
    except BaseException as err:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if not isinstance(err, OSError) or isinstance(err, DataError):
            raise
        # a full or failing disk: read and tokenize in memory, as without a cache
        logger.warning("could not write the data cache %s: %s", cache, err)
        read = read_pairs(cfg, train_specs, eval_spec, seed)
        work, prepared = None, _build(cfg, tokenizer, template, seed, fp, read, names)
    try:
        _save(prepared, cache)
    except OSError as err:
        logger.warning("could not write the data cache %s: %s", cache, err)
        if work is not None:  # the sets are memory-mapped from the work folder: copy them to RAM, then it goes
            prepared.train = prepared.train.flatten_indices(keep_in_memory=True)
            if prepared.eval is not None:
                prepared.eval = prepared.eval.flatten_indices(keep_in_memory=True)
            shutil.rmtree(work, ignore_errors=True)
        return prepared
    _say(console, f"tokenized data: cached at {cache}")
    hit = _load_cached(cache, names, template, fp)  # memory-mapped, as every later run gets it
    if hit is None:
        return prepared
    del prepared
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    hit.from_cache = False
    return hit


def _build(cfg: DataConfig, tokenizer, template: ChatTemplate, seed: int, fp: str, read: ReadData,
           names: tuple[str, str | None], work_dir: Path | None = None) -> PreparedData:
    limits = Limits.from_config(cfg)
    train_tok = tokenize_pairs(read.train.pairs, template, tokenizer, limits, cfg.num_proc, f"{fp}-train", work_dir)
    eval_tok = None
    if read.eval is not None:
        eval_tok = tokenize_pairs(read.eval.pairs, template, tokenizer, limits, cfg.num_proc, f"{fp}-eval", work_dir)

    tokenized = [train_tok] + ([eval_tok] if eval_tok is not None else [])
    columns = [stat_columns(d) for d in tokenized]
    stats = {c: np.concatenate([cols[c] for cols in columns]) for c in STAT_COLUMNS}
    train, train_drops = drop_rows(train_tok, work_dir and work_dir / f"{fp}-train-kept.arrow")
    evalset, eval_drops = drop_rows(eval_tok, work_dir and work_dir / f"{fp}-eval-kept.arrow") \
        if eval_tok is not None else (None, {})
    # an empty set would hang the training loop or give NaN metrics: say why now, with the drops
    if len(train) == 0:
        raise DataError(f"{names[0]}: no training pair left after tokenization{_why(train_drops, limits)}")
    if evalset is not None and len(evalset) == 0:
        eval_name = names[1] or f"the eval_fraction split of {names[0]}"
        raise DataError(f"{eval_name}: no eval pair left after tokenization{_why(eval_drops, limits)}")

    dropped: dict[str, int] = {}
    for norm in read.norms:
        for kind, n in norm.skipped.items():
            dropped[f"bad row: {kind}"] = dropped.get(f"bad row: {kind}", 0) + n
    for reason, n in [*train_drops.items(), *eval_drops.items()]:
        dropped[reason] = dropped.get(reason, 0) + n
    kept = stats["drop_reason"] == ""
    subject = read.train + read.eval if read.eval is not None else read.train
    summary = DataSummary(
        source=names[0],
        eval_source=names[1],
        format=" + ".join(dict.fromkeys(n.format for n in read.norms[: len(read.mixed)])),
        template=template.name,
        max_length=limits.max_length,
        prompt_budget=limits.prompt_budget,
        rows_read=sum(n.rows_read for n in read.norms),
        pairs=len(subject),
        kept=int(kept.sum()),
        train_size=len(train),
        eval_size=len(evalset) if evalset is not None else 0,
        dropped=dropped,
        truncated=int((stats["truncated"].astype(bool) & kept).sum()),
        lengths=length_stats(stats),
        first_errors=[e for n in read.norms for e in n.first_errors][:5],
        sources=read.source_counts(subject.refs, kept) if len(read.mixed) > 1 else [],
        checks=run_checks(read, subject, leak_markers(template, tokenizer), read.example_name, stats),
    )
    return PreparedData(train=train, eval=evalset, summary=summary, template=template, fingerprint=fp)


def _why(drops: dict[str, int], limits: Limits) -> str:
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(drops.items(), key=lambda kv: -kv[1]))
    return (f" (dropped {counts}; data.max_length is {limits.max_length}, data.min_response_tokens "
            f"{limits.min_response_tokens})") if counts else ""


# ------------------------------------------------------------------------------ reading and mixing


@dataclass
class SourceSpec:
    """One source to read: its resolved settings, and its rows when they are already in memory."""

    label: str  # the path or hub name; "train_data" / "eval_data" for rows given in Python
    settings: DataSource
    rows: RowSource | None = None

    @property
    def in_memory(self) -> bool:
        return self.rows is not None and self.rows.index is not None

    def identity(self) -> str:
        """What the cache key knows of this source (a hub dataset's rows are read for it, and kept)."""
        if self.in_memory:
            assert self.rows is not None
            return f"memory:{rows_digest(self.rows.rows)}"
        ident, rows = data_identity(self.settings.path, self.settings.split or "train", self.settings.subset)
        self.rows = self.rows or rows
        return ident

    def load(self) -> RowSource:
        if self.rows is None:
            self.rows = load_rows(self.settings.path, self.settings.split or "train", self.settings.subset)
        return self.rows


def source_specs(cfg: DataConfig, train_data: Any = None,
                 eval_data: Any = None) -> tuple[list[SourceSpec], SourceSpec | None]:
    """The sources of a run: ``data.train`` (one, or a mixture) or rows in memory, and the eval source."""
    if train_data is not None and cfg.train is not None:
        raise ConfigError("train_data was passed and data.train is set: use one of them")
    if eval_data is not None and (cfg.eval is not None or cfg.eval_fraction > 0):
        raise ConfigError("eval_data was passed and data.eval / data.eval_fraction is set: use one of them")
    inherit = {"format": "columns" if cfg.columns is not None else cfg.format, "columns": cfg.columns}
    if train_data is not None:
        rows = rows_from_memory(train_data, "train_data")
        train = [SourceSpec("train_data", DataSource(path="train_data", **inherit), rows)]
    elif cfg.train is not None:
        train = [SourceSpec(s.path, s) for s in cfg.sources]
    else:
        raise ConfigError("no training data: set data.train (a file, a hub dataset or a list of sources), "
                          "or pass train_data= in Python")
    evaluation = None
    if eval_data is not None:
        evaluation = SourceSpec("eval_data", DataSource(path="eval_data", **inherit),
                                rows_from_memory(eval_data, "eval_data"))
    elif cfg.eval is not None:
        evaluation = SourceSpec(cfg.eval, DataSource(path=cfg.eval, split=cfg.eval_split, subset=cfg.subset,
                                                     **inherit))
    return train, evaluation


@dataclass
class SourcedPairs:
    """Pairs with the row each came from: ``refs[k] = (source number, row index in that source)``."""

    pairs: Sequence[Pair]  # a list, or pairs on disk (``stored.StoredPairs``)
    refs: Refs

    def __len__(self) -> int:
        return len(self.pairs)

    def __add__(self, other: SourcedPairs) -> SourcedPairs:
        return SourcedPairs(stored.join(self.pairs, other.pairs), self.refs + other.refs)

    def select(self, positions: Sequence[int]) -> SourcedPairs:
        return SourcedPairs(stored.select(self.pairs, positions), self.refs.select(positions))


@dataclass
class ReadData:
    """The valid pairs of a run before tokenization, where each came from, and what was dropped.

    ``sources``/``norms``: every source read, training sources first (``mixed`` of them), then the
    eval file; a ref's source number indexes these lists. ``train``/``eval``: after mixing,
    ``max_samples`` and the ``eval_fraction`` split.
    """

    sources: list[RowSource]
    norms: list[NormalizedRows]
    mixed: list[int]  # pairs each training source gave the mixture
    train: SourcedPairs
    eval: SourcedPairs | None

    def where(self, ref: tuple[int, int]) -> str:
        return self.sources[ref[0]].where(ref[1])

    def number(self, ref: tuple[int, int]) -> Any:
        return self.sources[ref[0]].number(ref[1])

    def example_name(self, ref: tuple[int, int]) -> str:
        """``line 17`` with one source, ``a.jsonl line 17`` with several."""
        text = self.where(ref)
        return text.removeprefix(self.sources[ref[0]].name + " ") if len(self.sources) == 1 else text

    def bad_rows(self, sources: Sequence[int] | None = None) -> list[tuple[tuple[int, int], str]]:
        numbers = range(len(self.sources)) if sources is None else sources
        return [((k, i), kind) for k in numbers for i, kind in self.norms[k].bad_rows]

    def source_counts(self, refs: Refs, kept: np.ndarray) -> list[dict[str, Any]]:
        """Per training source: rows read, valid pairs, pairs in the mixture, pairs kept after tokenizing."""
        kept_by = Counter(refs.source[np.asarray(kept, dtype=bool)].tolist())
        return [{"name": self.sources[k].name, "format": self.norms[k].format, "rows_read": self.norms[k].rows_read,
                 "pairs": len(self.norms[k].pairs), "mixed": self.mixed[k], "kept": kept_by.get(k, 0)}
                for k in range(len(self.mixed))]


def read_pairs(cfg: DataConfig, train_specs: Sequence[SourceSpec], eval_spec: SourceSpec | None, seed: int,
               on_bad_row: str | None = None, work_dir: Path | None = None) -> ReadData:
    """Read and normalize every source, mix the training sources, then split off eval data.

    ``work_dir``: each source's pairs go to an Arrow file there as they are read (bounded memory)."""
    sources: list[RowSource] = []
    norms: list[NormalizedRows] = []
    parts: list[SourcedPairs] = []
    for spec in [*train_specs, *([eval_spec] if eval_spec is not None else [])]:
        k = len(sources)
        source = spec.load()
        s = spec.settings
        columns = s.columns.model_dump() if s.columns is not None else None
        # data.max_samples (one training source) keeps the first N pairs: the rest is never read
        limit = cfg.max_samples if k == 0 and len(train_specs) == 1 else None
        norm = normalize(source, fmt=s.format or "auto", columns=columns, on_bad_row=on_bad_row or cfg.on_bad_row,
                         store=work_dir / f"pairs-{k}.arrow" if work_dir is not None else None, limit=limit)
        if not spec.in_memory:  # the caller's own rows stay theirs; a file's rows live on only as pairs
            source, spec.rows = source.without_rows(), None
        sources.append(source)
        norms.append(norm)
        parts.append(SourcedPairs(norm.pairs, Refs.of(k, norm.indices)))
    train_parts = parts[: len(train_specs)]
    takes = mixture_takes([len(p) for p in train_parts], [s.settings for s in train_specs])
    chosen = [p.select(sample_positions(len(p), take, seed, k)) for k, (p, take) in enumerate(zip(
        train_parts, takes, strict=True))]
    train = SourcedPairs([], Refs.empty())
    for part in chosen:
        train = train + part
    if cfg.max_samples and len(train_specs) == 1:
        train = train.select(range(min(cfg.max_samples, len(train))))  # the first N pairs (quick runs)
    evaluation = parts[-1] if eval_spec is not None else None
    if evaluation is None and cfg.eval_fraction > 0:
        try:
            held = held_out(len(train), cfg.eval_fraction, seed)
        except DataError as err:
            raise DataError(f"{_display_name(train_specs)}: {err}") from err
        train, evaluation = train.select(np.flatnonzero(~held).tolist()), train.select(np.flatnonzero(held).tolist())
    return ReadData(sources=sources, norms=norms, mixed=[len(c) for c in chosen], train=train, eval=evaluation)


def mixture_takes(available: Sequence[int], settings: Sequence[DataSource]) -> list[int]:
    """How many pairs each source gives the mixture.

    A source's pool is its valid pairs, capped at its ``max_samples``. Without weights every pool is
    used whole. With weights ``w_i`` (W their sum), each source gives ``floor(s * w_i)`` pairs where
    ``s = min_j pool_j / w_j``: the largest mixture whose shares are ``w_i / W`` drawing each pair at
    most once, so the source that runs out first is used whole and sets the size.
    """
    pools = [min(n, s.max_samples) if s.max_samples else n for n, s in zip(available, settings, strict=True)]
    weights = [s.weight for s in settings]
    if not all(weights):  # DataConfig: every source has a weight, or none has
        return pools
    w = cast(list[float], weights)
    per_weight = min(n / wi for n, wi in zip(pools, w, strict=True))
    # the epsilon keeps float error (60 / 0.1 * 0.1 = 59.999…) from costing the limiting source a pair
    return [min(n, math.floor(per_weight * wi + 1e-6)) for n, wi in zip(pools, w, strict=True)]


def sample_positions(n: int, take: int, seed: int, source: int) -> list[int]:
    """``take`` of ``n`` positions drawn without replacement (seeded by ``seed`` and the source's
    place in the list), in source order; all of them, in order, when ``take >= n``."""
    if take >= n:
        return list(range(n))
    return sorted(np.random.default_rng([seed, source]).permutation(n)[:take].tolist())


def held_out(n: int, fraction: float, seed: int) -> np.ndarray:
    """Mask of the ``fraction`` of ``n`` pairs (at least one) held out for eval, with a fixed seed."""
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"eval_fraction {fraction} of {n} pairs leaves no training pairs")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return held


def run_checks(read: ReadData, subject: SourcedPairs, markers: Sequence[str], name: Callable[[Any], Any],
               stats: dict[str, np.ndarray] | None = None, train_sources: int | None = None) -> dict[str, Any]:
    """The cheap data checks (``checks.py``) of ``subject``, keyed as ``orpo audit --json`` keys them.

    ``stats``: the tokenizer's statistics of ``subject``'s pairs, in order (lengths are then tokens
    and truncation is known); without them lengths are characters. ``train_sources``: count bad rows
    of the first N sources only (the audit's subject), default all.
    """
    bad = read.bad_rows(range(train_sources) if train_sources is not None else None)
    faults = find_faults(subject.pairs, subject.refs, bad, markers)
    out: dict[str, Any] = {k: asdict(Finding.of(v, name)) for k, v in faults.items()}
    if stats is not None:
        length = LengthBias.of(stats["chosen_tokens"], stats["rejected_tokens"], "tokens")
        kept = stats["drop_reason"] == ""
        cut = [ref for ref, reason in zip(subject.refs, stats["drop_reason"], strict=True)
               if reason == NO_ROOM_FOR_RESPONSE]
        out["truncated_share"] = float((stats["truncated"].astype(bool) & kept).sum() / max(len(subject), 1))
        out["dropped_by_truncation"] = asdict(Finding.of(cut, name))
    else:
        length = LengthBias.of([len(p.chosen) for p in subject.pairs], [len(p.rejected) for p in subject.pairs],
                               "characters")
        out["truncated_share"] = out["dropped_by_truncation"] = None
    out.update(asdict(length))
    out["eval_prompt_overlap"] = None
    if read.eval is not None and len(read.eval):
        overlap = [read.eval.refs[i] for i in prompt_overlap(read.train.pairs, read.eval.pairs)]
        out["eval_prompt_overlap"] = asdict(Finding.of(overlap, name))
    return out


def _save(prepared: PreparedData, final: Path) -> None:
    """Write train.arrow, eval.arrow and summary.json to a temporary folder, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / disk.scratch_name("tmp", final.name)
    try:
        tmp.mkdir()
        write_split(prepared.train, tmp / "train.arrow")
        if prepared.eval is not None:
            write_split(prepared.eval, tmp / "eval.arrow")
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


def _load_cached(path: Path, names: tuple[str, str | None], template: ChatTemplate,
                 fp: str) -> PreparedData | None:
    try:
        meta = json.loads((path / "summary.json").read_text())
        train = datasets.Dataset.from_file(str(path / "train.arrow"))
        evalset = datasets.Dataset.from_file(str(path / "eval.arrow")) if (path / "eval.arrow").is_file() else None
        summary = DataSummary.from_dict(meta["summary"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, err)
        # an entry orpo named and wrote; a link in its place goes, never what it points to
        disk.remove_tree(path)
        return None
    # the key holds contents, not names: show the names this run used
    (summary.source, summary.eval_source), summary.template = names, template.name
    return PreparedData(train=train, eval=evalset, summary=summary, template=template, fingerprint=fp,
                        cache_path=path, from_cache=True)


def _display_name(specs: Sequence[SourceSpec | None]) -> str:
    """``a.jsonl``, ``a.jsonl + b.json`` (a mixture), ``train_data (in memory: DataFrame)``."""
    names = []
    for spec in specs:
        assert spec is not None
        if spec.in_memory:
            names.append(f"{spec.label} (in memory: {len(spec.load())} rows)")
        else:
            names.append(spec.label)
    return " + ".join(names)


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
    "ReadData",
    "SourceSpec",
    "SourcedPairs",
    "held_out",
    "mixture_takes",
    "prepare_data",
    "read_pairs",
    "run_checks",
    "source_specs",
    "tokenize_pairs",
]

