"""What a benchmark run returns: lm-eval's results dict, and the numbers read out of it.

No lm-eval import here: the trainer, the CLI's table and the tests read these without it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# lm-eval's per-task entries that are not metrics
_NOT_METRICS = {"alias", "name", "samples", "sample_len", " "}


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task (or group) as lm-eval reports it; ``stderr`` None where it gives none."""

    task: str
    metric: str
    value: float
    stderr: float | None


@dataclass
class BenchmarkRun:
    """The scores of the tasks asked for, lm-eval's whole results dict (JSON-safe) and the wall time."""

    scores: list[TaskScore]
    raw: dict[str, Any]
    seconds: float

    def flat(self) -> dict[str, float]:
        """``{"<task>_<metric>": value, "<task>_<metric>_stderr": stderr}`` (stderr only where lm-eval gives one)."""
        out: dict[str, float] = {}
        for s in self.scores:
            out[f"{s.task}_{s.metric}"] = s.value
            if s.stderr is not None:
                out[f"{s.task}_{s.metric}_stderr"] = s.stderr
        return out


def scores_from(raw: dict[str, Any]) -> list[TaskScore]:
    """The numeric metrics of every top-level entry of ``raw["results"]``.

    Top level: a task or group that is not a subtask of another entry (``group_subtasks``), so a
    requested group (mmlu) gives its aggregate, not its 57 subtasks; a tag gives each of its tasks.
    ``acc,none`` -> ``acc``; another filter stays in the name (``exact_match_strict-match``).
    """
    results = raw.get("results") or {}
    inner = {t for subs in (raw.get("group_subtasks") or {}).values() for t in subs}
    scores: list[TaskScore] = []
    for task, entry in results.items():
        if task in inner:
            continue
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not _number(value):
                continue
            err = entry.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            scores.append(TaskScore(task=task, metric=name, value=float(value),
                                    stderr=float(err) if _number(err) and math.isfinite(float(err)) else None))
    return scores


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def column(score: TaskScore) -> str:
    """The table's column name of a score: ``ifeval prompt_level_strict_acc``."""
    return f"{score.task} {score.metric}"


def shown(score: TaskScore) -> str:
    """``0.1234 ± 0.0123`` (lm-eval's standard error), or the value alone."""
    return f"{score.value:.4f}" + (f" ± {score.stderr:.4f}" if score.stderr is not None else "")


def file_name(model: str, taken: set[str]) -> str:
    """A results file name from a model path or hub name, unique among ``taken`` (``runs_a_final.json``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", model.replace("..", "")).strip("._-") or "model"
    name, k = f"{stem}.json", 2
    while name in taken or name == "benchmark.json":
        name, k = f"{stem}-{k}.json", k + 1
    taken.add(name)
    return name
