"""``orpo audit``: what is wrong with a preference dataset, found before any training.

The data is read exactly as training reads it (``pipeline.source_specs`` / ``read_pairs``: the same
readers, formats and normalization; with a model, the same template, tokenization and truncation),
except that bad rows are always counted instead of stopping at the first. On top of the cheap
checks that ``orpo train`` prints too (``checks.py``), a model scores every pair: its starting
accuracy, and the pairs it prefers the rejected response of most strongly, which are the first
places to look for swapped labels.

Row numbers are how the source names its rows: the file line for JSON Lines, the 1-based row for
JSON, CSV and Parquet, the index for data given in Python (``row_numbers`` in the JSON says which).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from orpo.config import ConfigError, DataConfig, format_validation_error
from orpo.data.cache import quiet_progress
from orpo.data.checks import DEFINITIONS, TEXT_FINDINGS, leak_markers
from orpo.data.pipeline import read_pairs, run_checks, source_specs
from orpo.data.summary import CHECK_LABELS, render_checks
from orpo.data.templates import ChatTemplate, resolve_chat_template
from orpo.data.tokenize import STAT_COLUMNS, Limits
from orpo.data.tokenized import drop_rows, tokenize_pairs

LABEL_NOISE_CANDIDATES = 20

# The JSON object's keys, in order. The finding keys and the numbers after them are the contract.
JSON_KEYS = ("source", "format", "template", "row_numbers", "max_length", "rows", "pairs", "dropped",
             *TEXT_FINDINGS, "chosen_longer_share", "mean_chosen_length", "mean_rejected_length", "length_unit",
             "truncated_share", "dropped_by_truncation", "eval_prompt_overlap", "accuracy",
             "label_noise_candidates", "definitions")


@dataclass
class AuditReport:
    """What ``orpo audit`` found; ``to_json()`` is the ``--json`` object, ``render()`` the text report."""

    source: str
    format: str
    template: str
    row_numbers: str  # "line" | "row" | "index"
    max_length: int | None  # None: not tokenized (no model or tokenizer)
    rows: int
    pairs: int
    dropped: dict[str, int]
    checks: dict[str, Any]  # run_checks(): findings, length bias, truncation, eval overlap
    accuracy: float | None = None
    label_noise_candidates: list[dict[str, Any]] | None = None  # [{row, log_odds_ratio}], most negative first
    first_errors: list[str] = field(default_factory=list)
    eval_pairs: int | None = None  # with --eval: its valid pairs (the eval overlap's share is of these)

    def to_json(self) -> dict[str, Any]:
        values = {**self.checks, "source": self.source, "format": self.format, "template": self.template,
                  "row_numbers": self.row_numbers, "max_length": self.max_length, "rows": self.rows,
                  "pairs": self.pairs, "dropped": self.dropped, "accuracy": self.accuracy,
                  "label_noise_candidates": self.label_noise_candidates, "definitions": DEFINITIONS}
        return {key: values[key] for key in JSON_KEYS}

    def render(self, width: int = 110) -> str:
        """One screen: the counts, every check (found or not), lengths, and the model's view."""
        from rich.console import Console
        from rich.table import Table

        head = Table(title=f"orpo audit: {self.source}", show_header=False, title_justify="left")
        head.add_column(style="bold")
        head.add_column()
        head.add_row("format / template", f"{self.format} / {self.template}"
                     + (f", max_length {self.max_length}" if self.max_length else "  (no tokenizer: lengths in characters)"))
        head.add_row("rows / pairs", f"{self.rows} rows read, {self.pairs} valid pairs")
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        head.add_row("dropped", f"{sum(self.dropped.values())}" + (f"  ({drops})" if drops else ""))
        if self.first_errors:
            head.add_row("first bad row", self.first_errors[0])
        if self.accuracy is not None:
            head.add_row("model accuracy", f"{self.accuracy:.3f}  (share of pairs whose chosen response is the more "
                         "likely one, before training)")
        checks = render_checks(self.checks, self.pairs, only_found=False,
                               title=f"Checks (examples: {self.row_numbers} numbers)", eval_pairs=self.eval_pairs)
        out = io.StringIO()
        console = Console(file=out, width=width, color_system=None, force_terminal=False)
        console.print(head)
        if checks is not None:
            console.print(checks)
        if self.label_noise_candidates:
            console.print(f"Label-noise candidates: the pairs the model prefers the rejected response of most "
                          f"strongly: {self.row_numbers} (log odds ratio)")
            noise = Table(show_header=False)
            cells = [f"{c['row']} ({c['log_odds_ratio']:+.2f})" for c in self.label_noise_candidates]
            for start in range(0, len(cells), 5):
                noise.add_row(*cells[start : start + 5])
            console.print(noise)
        found = [CHECK_LABELS[k] for k in (*TEXT_FINDINGS, "dropped_by_truncation", "eval_prompt_overlap")
                 if (self.checks.get(k) or {}).get("count")]
        if sum(self.dropped.values()):
            found.insert(0, "dropped rows")
        console.print("found: " + ", ".join(found) if found else "found: no faults")
        return out.getvalue().rstrip()

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)


def audit(data: Any, *, format: str = "auto", columns: dict[str, str] | None = None, split: str = "train",
          eval: Any = None, model: Any = None, tokenizer: Any = None, chat_template: str | None = None,
          max_length: int | None = None, max_prompt_length: int | None = None, min_response_tokens: int | None = None,
          batch_size: int = 8) -> AuditReport:
    """Audit ``data`` (a path, a hub dataset, or rows in memory) the way training would read it.

    ``model``: a model folder or hub name (its tokenizer comes with it), or a loaded model with
    ``tokenizer``. ``tokenizer`` alone gives token lengths and truncation without scoring.
    ``max_length``, ``max_prompt_length``, ``min_response_tokens``: truncation as ``data.*`` sets it
    (same defaults); they need a tokenizer.
    """
    if isinstance(model, str):
        model, tokenizer = _load_model(model)
    elif model is not None and tokenizer is None:
        raise ConfigError("audit: a model object needs its tokenizer (tokenizer=...)")
    elif model is not None:
        from orpo.train.model import ensure_pad_token

        # as training does to a loaded tokenizer: scoring pads batches
        ensure_pad_token(tokenizer)
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length,
              "min_response_tokens": min_response_tokens}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits and tokenizer is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in limits)
        raise ConfigError(f"{flags} counts tokens: give --model (its tokenizer tokenizes)")
    in_memory = not isinstance(data, str)
    eval_in_memory = eval is not None and not isinstance(eval, str)
    try:
        cfg = DataConfig(
            train=None if in_memory else data, train_split=split, format=format,  # type: ignore[arg-type]
            columns=columns, eval=None if eval_in_memory else eval, eval_split=split, on_bad_row="skip", **limits,
        )
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source="audit").replace(
            "\n  see docs/configuration.md for every key and its default", "")) from None
    train_specs, eval_spec = source_specs(cfg, data if in_memory else None, eval if eval_in_memory else None)
    read = read_pairs(cfg, train_specs, eval_spec, seed=0, on_bad_row="skip")
    template = _template(chat_template, tokenizer)
    markers = leak_markers(template, tokenizer)

    dropped = {f"bad row: {kind}": n for kind, n in read.norms[0].skipped.items()}
    stats = encoded = None
    if tokenizer is not None:
        with quiet_progress():
            encoded = tokenize_pairs(read.train.pairs, template, tokenizer, Limits.from_config(cfg))
        stats = {c: np.asarray(encoded[c]) for c in STAT_COLUMNS}
        for reason, n in drop_rows(encoded)[1].items():
            dropped[reason] = n
    report = AuditReport(
        source=train_specs[0].label, format=read.norms[0].format, template=template.name,
        row_numbers=read.sources[0].numbering, max_length=cfg.max_length if tokenizer is not None else None,
        rows=read.norms[0].rows_read, pairs=len(read.train), dropped=dropped,
        checks=run_checks(read, read.train, markers, read.number, stats, train_sources=1),
        first_errors=read.norms[0].first_errors, eval_pairs=len(read.eval) if read.eval is not None else None,
    )
    if model is not None and encoded is not None:
        _score(report, model, tokenizer, encoded, [read.number(r) for r in read.train.refs], batch_size)
    return report


def _score(report: AuditReport, model, tokenizer, encoded, numbers: list[Any], batch_size: int) -> None:
    """Accuracy and label-noise candidates from the model's per-pair log odds ratios (kept pairs only)."""
    from orpo.loss import log_odds
    from orpo.train.evaluate import pair_logps

    reasons = np.asarray(encoded["drop_reason"])
    kept = np.flatnonzero(reasons == "")
    dataset, _ = drop_rows(encoded)
    if len(kept) == 0:
        return
    chosen, rejected = pair_logps(model, dataset, tokenizer.pad_token_id, batch_size)
    ratio = (log_odds(chosen) - log_odds(rejected)).tolist()
    report.accuracy = float((chosen > rejected).float().mean())
    worst = sorted((r, i) for i, r in enumerate(ratio) if r < 0)[:LABEL_NOISE_CANDIDATES]
    report.label_noise_candidates = [{"row": numbers[int(kept[i])], "log_odds_ratio": round(r, 4)} for r, i in worst]


def _template(setting: str | None, tokenizer) -> ChatTemplate:
    if tokenizer is None and setting in (None, "none"):
        return ChatTemplate(name="none", jinja=None)  # the cheap checks only need its markers
    return resolve_chat_template(setting, tokenizer)


def _load_model(name: str):
    from orpo.train.evaluate import load_for_inference

    return load_for_inference(name)
