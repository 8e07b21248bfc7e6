"""``orpo sweep CONFIG key=v1,v2,… [key=…]``: a grid of runs of one config, and a table of how they did.

Each ``key=v1,v2`` (a comma outside brackets and quotes) is a swept key; a ``key=value`` without
one is fixed for every run, as in ``orpo train``. The runs go one after another in this process,
each in its own subfolder of the config's ``train.output_dir``, named by its values
(``beta-0.1_learning_rate-1e-3``). Every configuration is validated before the first run starts.
A run that fails is recorded (status and error) and the sweep goes on, unless ``stop_on_failure``.

After every run, ``OUTPUT_DIR/sweep/`` is rewritten (atomically, as one folder): ``sweep.json``
(every run: values, status, final and best eval metrics, warnings) and ``sweep.md`` (the table,
sorted by a metric), so an interrupted sweep leaves a table that says which runs are ``pending``. At the end, the table
is printed and ``orpo.report.write_report`` writes a report of all runs to ``OUTPUT_DIR/report/``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orpo import disk
from orpo.config import Config, ConfigError, load_config, metric_goal

WHAT = "train.output_dir (the sweep's folder)"
SHOWN = ("eval_loss", "eval_accuracy", "eval_log_odds_ratio", "eval_margin", "eval_general_ppl")


def split_values(text: str) -> list[str]:
    """``a,b,[c, d],'e,f'`` -> ``['a', 'b', '[c, d]', "'e,f'"]``: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_grid(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``key=value`` arguments into swept keys (several values) and fixed overrides."""
    swept: dict[str, list[str]] = {}
    fixed: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"'{arg}' is not of the form key.path=value or key.path=v1,v2,...")
        key, value = (s.strip() for s in arg.split("=", 1))
        values = split_values(value)
        if len(values) == 1:
            fixed.append(f"{key}={value}")
            continue
        if any(v == "" for v in values):
            raise ConfigError(f"'{arg}': an empty value in the list")
        if key in swept:
            raise ConfigError(f"'{key}' is swept twice")
        if key == "train.output_dir":
            raise ConfigError("train.output_dir cannot be swept: each run gets a subfolder of it")
        swept[key] = values
    if not swept:
        raise ConfigError("nothing to sweep: give at least one key=v1,v2,... (use `orpo train` for one run)")
    return swept, fixed


def run_name(values: dict[str, str]) -> str:
    """A folder name from a run's values: ``<key>-<value>`` joined by ``_``, the key's last part (the
    whole key when two share it), a list value's items joined by ``+`` (``[q, v]`` -> ``q+v``)."""
    lasts = [k.split(".")[-1] for k in values]
    parts = []
    for key, value in values.items():
        label = key.split(".")[-1] if lasts.count(key.split(".")[-1]) == 1 else key
        plain = re.sub(r"[\[\]{}'\" ]", "", value).replace(",", "+").replace(":", "-")
        parts.append(f"{label}-{plain}")
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", "_".join(parts))


@dataclass
class SweepRun:
    name: str
    values: dict[str, str]
    output_dir: str
    status: str = "pending"  # pending | ok | failed | stopped
    error: str | None = None
    steps: int | None = None
    final: dict[str, float] = field(default_factory=dict)  # the last eval row's eval_* metrics
    best: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {value, step}
    warnings: list[str] = field(default_factory=list)


def read_results(run: SweepRun) -> None:
    """Fill a run's steps, final/best eval metrics and warnings from its metrics.jsonl (if any)."""
    from orpo.train.logger import read_metrics

    path = Path(run.output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    rows = read_metrics(path)
    steps = [r["step"] for r in rows if "loss" in r]
    run.steps = steps[-1] if steps else 0
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    run.warnings = [r["warning"] for r in rows if "warning" in r]
    if not evals:
        return
    run.final = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    run.final["step"] = evals[-1]["step"]
    for key in run.final:
        goal = metric_goal(key) if key.startswith("eval_") else None
        points = [(r[key], r["step"]) for r in evals if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if goal is None or not points:
            continue
        value, step = (min if goal == "min" else max)(points, key=lambda p: p[0])
        run.best[key] = {"value": value, "step": step}


def sort_runs(runs: list[SweepRun], metric: str) -> list[SweepRun]:
    """By the final value of ``metric`` (best first by its direction); runs without it last, in grid order."""
    sign = -1.0 if metric_goal(metric) == "max" else 1.0

    def key(r: SweepRun) -> tuple[int, float]:
        v = r.final.get(metric)
        ok = r.status == "ok" and isinstance(v, int | float) and math.isfinite(v)
        return (0, sign * v) if ok else (1, 0.0)  # type: ignore[operator]

    return sorted(runs, key=key)


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def markdown_table(runs: list[SweepRun], keys: list[str], metrics: list[str]) -> str:
    """One row per run: its values, status, steps, and per metric the final value and the best (step)."""
    head = ["run", *keys, "status", "steps"]
    for m in metrics:
        head += [f"final {m}", f"best {m} (step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[0][:120]}"
        cells = [r.name, *(r.values[k] for k in keys), status.replace("|", "/"), _cell(r.steps)]
        for m in metrics:
            best = r.best.get(m)
            cells += [_cell(r.final.get(m)), f"{best['value']:.4f} ({best['step']})" if best else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Sweep:
    """A grid of configured runs; ``run()`` trains them one after another."""

    config_path: str
    swept: dict[str, list[str]]
    fixed: list[str]
    sort: str = "eval_loss"
    metrics: list[str] | None = None
    stop_on_failure: bool = False

    def __post_init__(self) -> None:
        if not self.sort.startswith("eval_") or metric_goal(self.sort) is None:
            raise ConfigError(f"--sort {self.sort}: not an eval metric with a known direction (eval_loss, "
                              "eval_accuracy, eval_log_odds_ratio, ...)")
        base = load_config(self.config_path, self.fixed)
        self.output_dir = Path(base.train.output_dir)
        self.runs: list[SweepRun] = []
        self.configs: list[Config] = []
        names = set()
        for combo in itertools.product(*self.swept.values()):
            values = dict(zip(self.swept, combo, strict=True))
            name = run_name(values)
            if name in names:
                raise ConfigError(f"two runs of the sweep would share the folder name '{name}'")
            names.add(name)
            out = self.output_dir / name
            overrides = [*self.fixed, *(f"{k}={v}" for k, v in values.items()), f"train.output_dir={out}"]
            try:
                cfg = load_config(self.config_path, overrides)
            except ConfigError as e:
                raise ConfigError(f"run {name}: {e}") from None
            self.configs.append(cfg)
            self.runs.append(SweepRun(name=name, values=values, output_dir=str(out)))
        disk.inspect_folder(self.output_dir, "sweep", WHAT)

    def shown_metrics(self) -> list[str]:
        if self.metrics:
            return self.metrics
        present = {k for r in self.runs for k in r.final}
        if "eval_log_odds_ratio" in present:
            present.discard("eval_margin")  # ORPO's own separation measure says it better
        return [self.sort] + [m for m in SHOWN if m != self.sort and m in present]

    def write(self) -> str:
        """Rewrite OUTPUT_DIR/sweep/ (sweep.json, sweep.md) as one atomic folder; return the markdown table."""
        table = markdown_table(sort_runs(self.runs, self.sort), list(self.swept), self.shown_metrics())
        done = sum(r.status != "pending" for r in self.runs)
        md = (f"# Sweep of {self.config_path}\n\nSwept: "
              + ", ".join(f"`{k}` = {', '.join(v)}" for k, v in self.swept.items())
              + (f"; fixed: {', '.join(f'`{x}`' for x in self.fixed)}" if self.fixed else "")
              + f". Runs finished: {done} of {len(self.runs)}. Sorted by final `{self.sort}` "
              f"({'highest' if metric_goal(self.sort) == 'max' else 'lowest'} first).\n\n{table}\n")
        data = {"config": self.config_path, "swept": self.swept, "fixed": self.fixed, "sort": self.sort,
                "runs": [asdict(r) for r in sort_runs(self.runs, self.sort)]}
        disk.claim(self.output_dir, "sweep", WHAT)
        with disk.atomic_dir(disk.child(self.output_dir, "sweep", WHAT)) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(data, indent=2) + "\n")
            (tmp / "sweep.md").write_text(md)
        return table

    def run(self, console=None) -> list[SweepRun]:
        """Train every run in grid order; returns the runs with their results."""
        from rich.console import Console

        from orpo.train.trainer import Trainer, TrainingStopped

        console = console or Console(stderr=True)
        self.write()
        for i, (run, cfg) in enumerate(zip(self.runs, self.configs, strict=True)):
            console.print(f"[bold]sweep run {i + 1} of {len(self.runs)}: {run.name}[/bold] "
                          f"({', '.join(f'{k}={v}' for k, v in run.values.items())})", highlight=False)
            disk.child(self.output_dir, run.name, WHAT)
            try:
                Trainer(cfg, console=console).setup().train()
                run.status = "ok"
            except TrainingStopped as e:
                run.status, run.error = "stopped", str(e)
                read_results(run)
                self.write()
                raise
            except Exception as e:  # a failed run is a result of the sweep, not its end
                run.status, run.error = "failed", f"{type(e).__name__}: {e}"
                console.print(f"sweep run {run.name} failed: {run.error}", highlight=False, soft_wrap=True)
            read_results(run)
            self.write()
            _free_memory()
            if run.status == "failed" and self.stop_on_failure:
                break
        return self.runs

    def report(self) -> str:
        """Write the report of all runs with metrics to OUTPUT_DIR/report/; return a line saying what happened."""
        try:
            from orpo.report import write_report  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            return "report: skipped (orpo.report is not in this version of orpo)"
        ran = [r for r in self.runs if (Path(r.output_dir) / "metrics.jsonl").is_file()]
        if not ran:
            return "report: skipped (no run wrote metrics)"
        try:
            out = disk.child(self.output_dir, "report", WHAT)
            write_report([Path(r.output_dir) for r in ran], out, [r.name for r in ran])
        except Exception as e:  # the runs and the table are done and saved; say why the report is not
            return f"report: failed ({type(e).__name__}: {e}); the table is complete"
        return f"report: {out}"


def _free_memory() -> None:
    """Let the next run start with the memory the last one held (its trainer is garbage by now)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(sweep: Sweep) -> str:
    """The runs a sweep would make (``--dry-run``), as YAML."""
    return yaml.safe_dump([{"name": r.name, "output_dir": r.output_dir, "values": r.values} for r in sweep.runs],
                          sort_keys=False)
