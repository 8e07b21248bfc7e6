"""``train.benchmark_tasks``: lm-evaluation-harness tasks on the live model during training.

Preference metrics say whether the model separates chosen from rejected; they do not say whether
it still knows what it knew. The benchmarks run at step 0 (the baseline), every
``train.benchmark_every`` steps and once at the end, before ``final/`` is written, so the model
card lists the final numbers. Each run is one metrics row, ``bench_<task>_<metric>`` (and its
``_stderr``), in metrics.jsonl and the trackers; ``orpo report`` plots them.

lm-eval's whole results of each run (its task configs, the documents it scored, the versions)
are appended to ``OUTPUT_DIR/benchmarks.jsonl``, a line per run, as ``orpo benchmark --out`` keeps
them.

``forgetting``: a metric worse than its step-0 value by more than ``train.health.benchmark_drop``
of it (lower where lm-eval says higher is better, higher otherwise) warns once. The baselines
live in ``state.watchers["benchmarks"]``, so a resumed run compares with the same step 0.

Every rank runs the same forwards on the whole task (the model without its DDP wrapper; a
sharded one gathers its weights in each forward, so the ranks must stay in lockstep), and the
main process's numbers are broadcast so every rank takes the same decisions.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo import disk
from orpo.config import Config, ConfigError, HealthConfig
from orpo.train.logger import read_rows, rows_up_to
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer, TrainResult

KEY = "benchmarks"
PREFIX = "bench_"
BENCH_FILE = "benchmarks.jsonl"


class Benchmarks(Watcher):
    """Runs ``tasks`` when due and keeps the step-0 value of each metric to compare against."""

    code = "forgetting"

    def __init__(self, cfg: Config, health: HealthConfig | None):
        t = cfg.train
        self.tasks, self.every, self.limit = list(t.benchmark_tasks), t.benchmark_every, t.benchmark_limit
        self.max_new_tokens, self.include_path = t.benchmark_max_new_tokens, t.benchmark_include_path
        self.chat_template = cfg.model.chat_template
        self.health = health

    def on_setup(self, trainer: Trainer) -> None:
        try:
            from orpo.harness import resolve_tasks
        except ImportError as e:
            raise ConfigError(f"train.benchmark_tasks needs lm-evaluation-harness: pip install 'orpo[eval]' ({e})") from e
        # an unknown task name stops the run here, before the run folder is touched
        self.tasks = resolve_tasks(self.tasks, self.include_path)

    def on_start(self, trainer: Trainer) -> None:
        """Start benchmarks.jsonl afresh (on resume: keep the runs up to the resumed step), then the baseline."""
        if trainer.is_main:
            path = disk.child(trainer.output_dir, BENCH_FILE, "train.output_dir")
            # a line cut short by a kill while it was appended goes, as in metrics.jsonl
            kept = rows_up_to(path, trainer.state.step) if trainer.resume_from is not None else []
            disk.write_atomic(path, "".join(_line(r) for r in kept).encode())
        if trainer.state.step == 0:
            self.run(trainer)

    def on_step(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        if trainer.due(self.every) and trainer.state.step < trainer.total_steps:
            self.run(trainer)

    def on_finish(self, trainer: Trainer) -> None:
        mem = trainer.state.watchers.get(KEY) or {}
        if mem.get("last_step") != trainer.state.step:
            self.run(trainer)

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        mem = trainer.state.watchers.get(KEY) or {}
        last = mem.get("last") or {}
        if last:
            shown = "  ".join(f"{k.removeprefix(PREFIX)} {v:.4f}" for k, v in last.items() if not k.endswith("_stderr"))
            result.notes.append(f"benchmarks     step {mem['last_step']}: {shown}")

    def run(self, trainer: Trainer) -> dict[str, float]:
        """The tasks on the model as it is now; logged, remembered, and checked for forgetting."""
        from orpo.harness import run_tasks

        acc = trainer.accelerator
        t = trainer.cfg.train
        started = time.perf_counter()
        # the model without its DDP wrapper (forwards without backward), under the run's autocast
        with acc.autocast():
            result = run_tasks(acc.unwrap_model(trainer.model), trainer.tokenizer, self.tasks,
                               chat_template=self.chat_template, limit=self.limit, include_path=self.include_path,
                               batch_size=t.eval_batch_size or t.batch_size, max_length=trainer.cfg.data.max_length,
                               max_new_tokens=self.max_new_tokens, seed=t.seed)
        values = _flat(result)
        higher = _higher_is_better(result)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            values, higher = broadcast_object_list([values, higher], from_process=0)
        step, seconds = trainer.state.step, time.perf_counter() - started
        trainer.log({"step": step, **values, "bench_seconds": seconds})
        if trainer.is_main:
            disk.append_text(trainer.output_dir / BENCH_FILE,
                             _line({"step": step, "seconds": round(seconds, 3), "lm_eval": result.raw}))
        mem = trainer.state.watchers.setdefault(KEY, {"baseline": {}, "baseline_step": step})
        mem["docs"] = _docs(result.raw)
        for name, value in values.items():
            if not name.endswith("_stderr") and math.isfinite(value):
                mem["baseline"].setdefault(name, value)
        mem["last"], mem["last_step"], mem["higher_is_better"] = values, step, higher
        trainer.say(f"step {step:>5}  benchmarks " + "  ".join(
            f"{k.removeprefix(PREFIX)} {v:.4f}" for k, v in values.items() if not k.endswith("_stderr")))
        self._check(trainer, values, mem)
        return values

    def _check(self, trainer: Trainer, values: dict[str, float], mem: dict[str, Any]) -> None:
        if self.health is None or self.code in trainer.state.warnings:
            return
        drop = self.health.benchmark_drop
        for name, value in values.items():
            base = mem["baseline"].get(name)
            if name.endswith("_stderr") or base is None or not math.isfinite(value) or base == 0:
                continue
            up = mem["higher_is_better"].get(name, True)
            worse = (base - value) if up else (value - base)
            if worse > drop * abs(base):
                trainer.warn(self.code, (
                    f"{name} went from {base:.4f} at step {mem['baseline_step']} to {value:.4f} "
                    f"({'lower' if up else 'higher'} by {worse / abs(base):.0%}, more than train.health.benchmark_drop "
                    f"{drop:g}): the model is losing what the benchmark measures; lower the learning rate or λ, "
                    "train fewer steps, or mix general data into training"))
                return


def _flat(result: Any) -> dict[str, float]:
    """``bench_<task>_<metric>`` and ``bench_<task>_<metric>_stderr`` (when lm-eval gives one)."""
    out: dict[str, float] = {}
    for s in result.scores:
        name = f"{PREFIX}{_slug(s.task)}_{_slug(s.metric)}"
        out[name] = float(s.value)
        if s.stderr is not None and math.isfinite(float(s.stderr)):
            out[f"{name}_stderr"] = float(s.stderr)
    return out


def _higher_is_better(result: Any) -> dict[str, bool]:
    """lm-eval's direction of each metric (``higher_is_better`` in its results), true where it says nothing."""
    table = (result.raw or {}).get("higher_is_better") or {}
    out: dict[str, bool] = {}
    for s in result.scores:
        value = (table.get(s.task) or {}).get(s.metric)
        out[f"{PREFIX}{_slug(s.task)}_{_slug(s.metric)}"] = True if value is None else bool(value)
    return out


def _docs(raw: dict[str, Any]) -> dict[str, int]:
    """The documents lm-eval scored per task (``n-samples``' effective count, after the limit)."""
    counts = raw.get("n-samples") or {}
    return {task: int(n["effective"]) for task, n in counts.items() if isinstance(n, dict) and "effective" in n}


def _line(row: dict[str, Any]) -> str:
    # lm-eval's results hold a few non-JSON values (dtypes, functions in configs): as their text
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The runs in a ``benchmarks.jsonl`` (a run folder or the file): ``step``, ``seconds``, ``lm_eval``."""
    return read_rows(path, BENCH_FILE)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def build(cfg: Config) -> list[Watcher]:
    if not cfg.train.benchmark_tasks:
        return []
    h = cfg.train.health
    return [Benchmarks(cfg, h if h.enabled and "forgetting" not in h.ignore else None)]
