"""Where metrics go: ``metrics.jsonl`` (always), the trackers of ``train.report_to`` (``trackers``), a progress bar.

Only the main process logs; the trainer has already all-reduced the numbers it passes in.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from orpo.disk import append_text, stop_on_write_error, write_atomic
from orpo.train import trackers
from orpo.train.checkpoint import resume_hint

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: a non-finite number is written as null (the step is flagged skipped)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_report_to(report_to: Sequence[str]) -> None:
    """Fail before any work when a requested tracker cannot run."""
    trackers.check_installed(report_to)


class MetricsLogger:
    """One JSON object per logged step in ``metrics.jsonl``, mirrored to the trackers of ``report_to``.

    On resume from step N, rows after N (written by the killed run after its last checkpoint)
    are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, report_to: Sequence[str], config: dict[str, Any],
                 resume_step: int | None = None, run_name: str | None = None, project: str = "orpo",
                 tags: Sequence[str] = ()):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = rows_up_to(self.path, resume_step) if resume_step is not None else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        run = trackers.RunInfo(output_dir=Path(output_dir), config=config, resume_step=resume_step,
                               run_name=run_name or Path(output_dir).name, project=project, tags=tuple(tags))
        self.trackers = trackers.start(report_to, run)

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        # A full disk stops the run with SaveFailed (exit 5), the row taken back, not a traceback.
        size = self.path.stat().st_size if self.path.exists() else 0
        with stop_on_write_error(f"the metrics {self.path}", self.path, cleanup=lambda: os.truncate(self.path, size),
                                 next_step=resume_hint(self.path.parent)):
            # open per row: a few rows per second at most, and nothing stays open if the run dies
            append_text(self.path, json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        for t in self.trackers:
            t.log(scalars, row["step"])

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        """Eval samples (``samples.jsonl`` rows) to every tracker: text in TensorBoard, a table elsewhere."""
        for t in self.trackers:
            t.log_samples(samples, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (train and eval rows, in order)."""
    return _parse(run_file(path, METRICS_FILE))


def read_rows(path: str | Path, name: str) -> list[dict[str, Any]]:
    """Rows of the JSONL file ``name`` of a run (a run folder or the file), in order; none before it exists."""
    p = run_file(path, name)
    return _parse(p) if p.exists() else []


def run_file(path: str | Path, name: str) -> Path:
    p = Path(path)
    return p / name if p.is_dir() else p


def _parse(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def rows_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """Rows up to ``step``; a last line cut short (the run was killed while appending it) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return [r for r in rows if r.get("step", 0) <= step]


class ProgressBar:
    """A rich progress bar: step, loss, log odds ratio, accuracy, tokens/s, time left."""

    def __init__(self, total: int, start: int, console: Console | None, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")
        self._started = False

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        self._started = True
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, step: int, row: dict[str, Any] | None) -> None:
        stats = ""
        if row:
            stats = (f"loss {_fmt(row.get('loss'))}  lor {_fmt(row.get('log_odds_ratio'))}  "
                     f"acc {_fmt(row.get('accuracy'), '.2f')}  {_fmt(row.get('tokens_per_s'), ',.0f')} tok/s")
            if row.get("skipped_steps"):
                stats += f"  skipped {row['skipped_steps']}"
        self._progress.update(self._task, completed=step, stats=stats)

    def print(self, text: str) -> None:
        self._progress.console.print(text)


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "nan" if v is None else format(v, spec)


class Throughput:
    """Tokens per second of optimizer steps (eval and checkpoint time excluded) since the last read."""

    def __init__(self) -> None:
        self._tokens, self._seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self._tokens += tokens
        self._seconds += seconds

    def read(self) -> float:
        rate = self._tokens / max(self._seconds, 1e-9)
        self._tokens, self._seconds = 0, 0.0
        return rate
