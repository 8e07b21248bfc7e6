"""``orpo report``: what a person looks at after a run, for one run or several overlaid.

Reads only a run folder's files (``metrics.jsonl``, ``config.yaml``, ``data_summary.json``,
``samples.jsonl``), so it works on a finished run, a running one, or a copy from another machine.
Writes PNG figures (matplotlib's Agg canvas: no display, no pyplot state) and one HTML page with
the images inlined, which can be mailed or attached as it is:

    *.png           the figures (``orpo.figures``: loss, logps, preference, optim; benchmarks when
                    the run logged train.benchmark_tasks metrics)
    report.html     the figures, a table of final and best eval numbers, and per run its config,
                    data summary, warnings and latest samples
    summary.json    the table's numbers, for scripts

Train curves are drawn faint with a smoothed line over them (one batch is noisy); eval points are
markers: the eval set is the same at every eval, so they are the numbers to compare.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from orpo import disk
from orpo.figures import (
    _colors,
    _finite,
    _utf8,
    bench_metrics,
    plot_benchmarks,
    plot_logps,
    plot_loss,
    plot_optim,
    plot_preference,
)
from orpo.train.logger import METRICS_FILE
from orpo.train.samples import SAMPLES_FILE

FIGURES = ("logps", "loss", "preference", "optim")
# drawn only when a run logged train.benchmark_tasks metrics
OPTIONAL_FIGURES = ("benchmarks",)
TABLE_KEYS = ("accuracy", "margin", "log_odds_ratio", "logps_chosen", "logps_rejected", "nll_loss")
# The page runs no script and fetches nothing: its figures are data: URIs, its style inline. A run
# folder may come from anyone (a copy from another machine), so this backs up the escaping.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class NotARunError(FileNotFoundError):
    """A folder given to the report is not a training run (no metrics.jsonl with rows), or a file of it
    cannot be read; the message names the file and, where it can, the line."""


@dataclass
class Run:
    """One run folder, read."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    warnings: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    data_summary: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def objective(self) -> str:
        return str((self.config.get("orpo") or {}).get("objective", "orpo"))

    @property
    def objective_label(self) -> str:
        """The objective and its strength, e.g. ``orpo λ=0.1`` or ``dpo β=0.1``."""
        o = self.config.get("orpo") or {}
        params = {"orpo": [("λ", o.get("beta"))], "sft": [],
                  "simpo": [("β", o.get("simpo_beta")), ("γ", o.get("simpo_gamma"))],
                  "cpo": [("β", o.get("cpo_beta"))], "dpo": [("β", o.get("dpo_beta"))]}.get(self.objective, [])
        return " ".join([self.objective] + [f"{k}={_g(v)}" for k, v in params if v is not None])


def _g(v: Any) -> str:
    """A setting as the label shows it: ``0.1`` for a number, the text of anything else (a hand-edited config)."""
    return f"{v:g}" if _finite(v) and not isinstance(v, bool) else str(v)


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read a run folder; ``NotARunError`` (with what is missing, or which file and line is unreadable)."""
    p = Path(path)
    if not p.is_dir():
        raise NotARunError(f"{_shown(p)} is not a run folder: no such directory")
    if not (p / METRICS_FILE).is_file():
        raise NotARunError(f"{_shown(p)} is not a run folder: it has no {METRICS_FILE} "
                           "(give the train.output_dir of a run)")
    rows = _read_rows(p / METRICS_FILE)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        raise NotARunError(f"{_shown(p)} is not a run folder yet: {METRICS_FILE} has no metric rows")
    summary = p / "data_summary.json"
    return Run(name=name or p.name, path=p, train=train, evals=evals,
               warnings=[r for r in rows if "warning" in r], config=_read_config(p / "config.yaml"),
               data_summary=_read_json(summary) if summary.is_file() else None,
               samples=_read_rows(p / SAMPLES_FILE) if (p / SAMPLES_FILE).is_file() else [],
               benchmarks=[r for r in rows if any(k.startswith("bench_") and k != "bench_seconds" for k in r)])


# ------------------------------------------------------------------------------ reading
# A run folder may be a copy from anywhere: each reader checks the shape the report relies on, so a
# bad file is one NotARunError naming file and line (the CLI's exit 2), not a traceback mid-page.


def _shown(p: Path | str) -> str:
    """A path for a one-line message: quoted when it holds a newline or another unprintable character."""
    return str(p) if str(p).isprintable() else ascii(str(p))


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NotARunError(f"{_shown(path)}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise NotARunError(f"{_shown(path)} line {line}: not UTF-8 (byte {e.start}: {e.reason})") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's JSON Lines file, each an object with an integer ``step``.

    Lines end at ``\\n`` only (samples are written with ``ensure_ascii=False``, so a U+2028 in a
    completion is text). A last line without its newline that is not JSON yet is left out: the
    run is appending it now, or was stopped while it did.
    """
    lines = _read_text(path).split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{_shown(path)} line {n}"
        try:
            row = json.loads(line)
        except RecursionError:
            raise NotARunError(f"{where}: nested too deeply to read") from None
        except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
            if n == len(lines):
                break
            raise NotARunError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise NotARunError(f"{where}: expected a JSON object, got {type(row).__name__}")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**63:
            raise NotARunError(f"{where}: 'step' is missing or not an integer (0 or more)")
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except RecursionError:
        raise NotARunError(f"{_shown(path)}: nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise NotARunError(f"{_shown(path)} line {e.lineno}: not JSON ({e.msg})") from None
    except ValueError as e:
        raise NotARunError(f"{_shown(path)}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise NotARunError(f"{_shown(path)}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    """``config.yaml`` (empty when absent): a mapping, and its ``orpo`` section one too (the label reads it)."""
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(_read_text(path))
    except RecursionError:
        raise NotARunError(f"{_shown(path)}: nested too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise NotARunError(f"{_shown(path)}{line}: not YAML ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise NotARunError(f"{_shown(path)}: expected a mapping of settings, got a {type(config).__name__}")
    if not isinstance(config.get("orpo") or {}, dict):
        raise NotARunError(f"{_shown(path)}: orpo: expected a mapping, got a {type(config['orpo']).__name__}")
    return config


def default_names(paths: list[Path]) -> list[str]:
    """Folder names, or the shortest distinct path tails when two folders share a name."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------ numbers


def run_summary(run: Run) -> dict[str, Any]:
    """Final and best eval numbers, and the change of the log-probs since the first eval (step 0)."""
    out: dict[str, Any] = {"name": run.name, "path": str(run.path), "objective": run.objective_label,
                           "steps": run.train[-1]["step"] if run.train else 0}
    if run.evals:
        first, last = run.evals[0], run.evals[-1]
        finite = [r for r in run.evals if _finite(r.get("eval_loss"))]
        best = min(finite, key=lambda r: r["eval_loss"]) if finite else last
        out["final"] = {"step": last["step"], **{k: last.get(f"eval_{k}") for k in TABLE_KEYS}}
        out["best"] = {"step": best["step"], "loss": best.get("eval_loss"),
                       **{k: best.get(f"eval_{k}") for k in TABLE_KEYS}}
        out["change"] = {"from_step": first["step"],
                         **{k: _sub(last.get(f"eval_{k}"), first.get(f"eval_{k}"))
                            for k in ("logps_chosen", "logps_rejected")}}
    if run.benchmarks:
        first, last = run.benchmarks[0], run.benchmarks[-1]
        names = bench_metrics([run])
        out["benchmarks"] = {"first_step": first["step"], "step": last["step"],
                             **{k: {"first": first.get(k), "final": last.get(k),
                                    "stderr": last.get(f"{k}_stderr")} for k in names}}
    return out


def _sub(a: Any, b: Any) -> float | None:
    return a - b if _finite(a) and _finite(b) else None


# ------------------------------------------------------------------------------ the page


def write_report(run_dirs: list[Path], out_dir: Path, names: list[str] | None = None) -> Path:
    """Figures + one self-contained HTML page for the runs in ``run_dirs``; returns the HTML's path.

    Every folder is read before anything is written: a folder that is not a run raises
    ``NotARunError`` and leaves ``out_dir`` untouched.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise NotARunError("no run folders given")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    runs = [load_run(p, n) for p, n in zip(run_dirs, names or default_names(run_dirs), strict=True)]
    out_dir = disk.expand(out_dir)
    if any(out_dir.absolute() == p.absolute() for p in run_dirs):
        raise NotARunError(f"--out {out_dir} is one of the runs: write the report to a folder of its own")
    colors = _colors(len(runs))
    pngs: dict[str, bytes] = {}
    plots = {"logps": plot_logps, "loss": plot_loss, "preference": plot_preference, "optim": plot_optim,
             "benchmarks": plot_benchmarks}
    figures = FIGURES + (("benchmarks",) if any(r.benchmarks for r in runs) else ())
    summaries = [run_summary(r) for r in runs]
    # the whole folder, published at once: a report is never half old, half new
    with disk.publish_owned(out_dir, "report", "orpo report --out", legacy=_legacy_report) as tmp:
        for name in figures:
            fig = plots[name](runs, colors)
            fig.savefig(tmp / f"{name}.png", format="png")
            pngs[name] = (tmp / f"{name}.png").read_bytes()
        (tmp / "summary.json").write_text(_utf8(json.dumps(summaries, indent=2, ensure_ascii=False)), encoding="utf-8")
        (tmp / "report.html").write_text(_html(runs, summaries, pngs, colors), encoding="utf-8")
    return out_dir / "report.html"


def _legacy_report(folder: Path, names: list[str]) -> bool:
    """A report folder written before markers existed: nothing but a report's own files."""
    pngs = {f"{f}.png" for f in FIGURES + OPTIONAL_FIGURES}
    return set(names) <= {"report.html", "summary.json", *pngs} and "report.html" in names


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
.sample td { text-align: left; white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.8em; }
details { margin: 0.4em 0 1em; }
"""

_CAPTIONS = {
    "logps": "Chosen (solid) and rejected (dashed) log-probs of every run, then per run their change since "
             "step 0 (each on its own scale; the shaded band is the gap). SFT on the chosen responses tends to "
             "raise the rejected ones too; a preference term should hold them down.",
    "loss": "Loss, the NLL of the chosen responses (comparable across objectives) and each objective's own term.",
    "preference": "Whether the model prefers the chosen response: log odds ratio, accuracy and margin of the "
                  "length-averaged log-probs.",
    "optim": "Learning rate and gradient norm.",
    "benchmarks": "The train.benchmark_tasks metrics (lm-evaluation-harness) at the steps they ran, with lm-eval's "
                  "standard errors: a falling line while the preference metrics improve is forgetting.",
}


def _fmt(v: Any, signed: bool = False) -> str:
    """A table cell: a float to 3 places, anything else (a value from a run folder) as escaped text."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:+.3f}" if signed else f"{v:.3f}"
    return html.escape(str(v))


def _text(v: Any) -> str:
    """A sample's field as text: a string as it is, anything else (a hand-made samples.jsonl) as JSON."""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _html(runs: list[Run], summaries: list[dict[str, Any]], pngs: dict[str, bytes], colors: list[Any]) -> str:
    from matplotlib.colors import to_hex

    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
           f"content=\"{CSP}\"><title>orpo report</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>orpo report</h1><p>{len(runs)} run(s), written {datetime.now():%Y-%m-%d %H:%M}. In the "
           "figures, thin lines are train batches (smoothed when there are many steps, the raw values faint "
           "behind) and markers are evals: the eval set is the same at every eval, so those are the numbers "
           "to compare.</p>",
           "<h2>Final eval</h2><table><tr><th class='l'>run</th><th class='l'>objective</th><th>step</th>"
           "<th>accuracy</th><th>margin</th><th>log odds ratio</th><th>logp chosen</th><th>logp rejected</th>"
           "<th>Δ chosen</th><th>Δ rejected</th><th>NLL</th><th>best step</th></tr>"]
    for run, s, color in zip(runs, summaries, colors, strict=True):
        f, c, b = s.get("final", {}), s.get("change", {}), s.get("best", {})
        out.append(f"<tr><td class='l'><span class='swatch' style='background:{to_hex(color)}'></span>{e(run.name)}</td>"
                   f"<td class='l'>{e(run.objective_label)}</td><td>{_fmt(f.get('step'))}</td>"
                   f"<td>{_fmt(f.get('accuracy'))}</td><td>{_fmt(f.get('margin'), True)}</td>"
                   f"<td>{_fmt(f.get('log_odds_ratio'), True)}</td><td>{_fmt(f.get('logps_chosen'))}</td>"
                   f"<td>{_fmt(f.get('logps_rejected'))}</td><td>{_fmt(c.get('logps_chosen'), True)}</td>"
                   f"<td>{_fmt(c.get('logps_rejected'), True)}</td><td>{_fmt(f.get('nll_loss'))}</td>"
                   f"<td>{_fmt(b.get('step'))}</td></tr>")
    out.append("</table><p>Eval numbers at the last eval; Δ = change since the first eval (step 0). "
               "Best step: lowest eval loss of the run's own objective (losses of different objectives do "
               "not compare).</p>")
    for name in pngs:
        data = base64.b64encode(pngs[name]).decode()
        out.append(f"<h2>{e(name)}</h2><p>{e(_CAPTIONS[name])}</p><img alt='{e(name)}' "
                   f"src='data:image/png;base64,{data}'>")
    for run, s in zip(runs, summaries, strict=True):
        out.append(f"<h2>Run {e(run.name)}</h2><p><code>{e(str(run.path))}</code> · {e(run.objective_label)} · "
                   f"{_fmt(s['steps'])} steps</p>")
        out.append(_eval_table(s))
        if "benchmarks" in s:
            out.append(_bench_table(s["benchmarks"]))
        if run.warnings:
            out.append("<h3>Warnings</h3><ul>" + "".join(
                f"<li>step {_fmt(w['step'])}: <b>{e(str(w['warning']))}</b> {e(str(w.get('message', '')))}</li>"
                for w in run.warnings) + "</ul>")
        out.append(_samples_table(run))
        if run.data_summary:
            out.append(_data_table(run.data_summary))
        out.append(f"<details><summary>config.yaml</summary><pre>{e(yaml.safe_dump(run.config, sort_keys=False))}"
                   "</pre></details>")
    out.append("</body></html>")
    return _utf8("\n".join(out))


def _eval_table(s: dict[str, Any]) -> str:
    if "final" not in s:
        return "<p>No eval rows (set data.eval or data.eval_fraction, and train.eval_every).</p>"
    head = "".join(f"<th>{k}</th>" for k in TABLE_KEYS)
    rows = [f"<tr><td class='l'>{label} (step {_fmt(s[which]['step'])})</td>"
            + "".join(f"<td>{_fmt(s[which].get(k))}</td>" for k in TABLE_KEYS) + "</tr>"
            for label, which in (("final", "final"), ("best", "best"))]
    return f"<table><tr><th class='l'>eval</th>{head}</tr>{''.join(rows)}</table>"


def _bench_table(b: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td class='l'>{html.escape(k.removeprefix('bench_'))}</td><td>{_fmt(v['first'])}</td>"
                   f"<td>{_fmt(v['final'])}</td><td>{_fmt(v['stderr'])}</td></tr>"
                   for k, v in b.items() if isinstance(v, dict))
    return (f"<h3>Benchmarks</h3><table><tr><th class='l'>metric</th><th>step {_fmt(b['first_step'])}</th>"
            f"<th>step {_fmt(b['step'])}</th><th>stderr</th></tr>{rows}</table>")


def _samples_table(run: Run) -> str:
    if not run.samples:
        return "<p>No samples (set train.eval_generate: N to see completions of N eval prompts at each eval).</p>"
    last = max(r["step"] for r in run.samples)
    e = html.escape
    rows = "".join(f"<tr><td>{e(_text(r.get('prompt'))[-600:])}</td><td>{e(_text(r.get('completion')))}</td>"
                   f"<td>{e(_text(r.get('chosen')))}</td><td>{e(_text(r.get('rejected')))}</td></tr>"
                   for r in run.samples if r["step"] == last)
    return (f"<h3>Samples at step {_fmt(last)} (greedy)</h3><table class='sample'><tr><th class='l'>prompt (end)</th>"
            f"<th class='l'>completion</th><th class='l'>chosen</th><th class='l'>rejected</th></tr>{rows}</table>")


def _data_table(d: dict[str, Any]) -> str:
    """``data_summary.json`` as a table; a field of another shape than the pipeline writes is shown as it is."""
    e = html.escape
    dropped = d.get("dropped") or {}
    dropped = (", ".join(f"{k}: {v}" for k, v in dropped.items()) if isinstance(dropped, dict) else dropped) or "none"
    items = [("source", d.get("source")), ("eval source", d.get("eval_source") or "held out from train"),
             ("format / template", f"{d.get('format')} / {d.get('template')}"), ("pairs", d.get("pairs")),
             ("train / eval", f"{d.get('train_size')} / {d.get('eval_size')}"), ("dropped", dropped),
             ("truncated", d.get("truncated")), ("max_length", d.get("max_length"))]
    lengths = d.get("lengths")
    items += [(f"{k} tokens p50 / p90 / max", f"{v.get('p50')} / {v.get('p90')} / {v.get('max')}"
               if isinstance(v, dict) else v) for k, v in (lengths.items() if isinstance(lengths, dict) else [])]
    rows = "".join(f"<tr><td class='l'>{e(k)}</td><td class='l'>{e(str(v))}</td></tr>" for k, v in items)
    return f"<h3>Data</h3><table>{rows}</table>"
