"""``orpo report``: what a person looks at after a run, for one run or several overlaid.

Reads only a run folder's files (``metrics.jsonl``, ``config.yaml``, ``data_summary.json``,
``samples.jsonl``), so it works on a finished run, a running one, or a copy from another machine.
Writes PNG figures (matplotlib's Agg canvas: no display, no pyplot state) and one HTML page with
the images inlined, which can be mailed or attached as it is:

    loss.png        loss, NLL and each objective's own terms (or_loss, simpo_loss, ...)
    logps.png       chosen and rejected log-probs on one axis, and their change since step 0
                    (the ORPO paper's figure: SFT raises the rejected responses too)
    preference.png  log odds ratio, accuracy and margin, train and eval
    optim.png       learning rate and gradient norm
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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from orpo import disk
from orpo.train.logger import METRICS_FILE
from orpo.train.samples import SAMPLES_FILE

# each objective's own loss terms, drawn next to loss and NLL
OWN_TERMS = ("or_loss", "simpo_loss", "cpo_loss", "dpo_loss")
FIGURES = ("logps", "loss", "preference", "optim")
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
               samples=_read_rows(p / SAMPLES_FILE) if (p / SAMPLES_FILE).is_file() else [])


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
    return out


def _finite(v: Any) -> bool:
    """A number a figure can draw (an integer too large for a float is not one)."""
    try:
        return isinstance(v, int | float) and math.isfinite(v)
    except OverflowError:
        return False


def _sub(a: Any, b: Any) -> float | None:
    return a - b if _finite(a) and _finite(b) else None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a missing or non-finite value is NaN (a gap in the line)."""
    pts = [(r["step"], r[key] if _finite(r.get(key)) else math.nan) for r in rows if key in r]
    return [s for s, _ in pts], [v for _, v in pts]


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average over about a 30th of the points (NaN-tolerant)."""
    alpha = min(1.0, 2.0 / (len(values) / 30 + 1))
    out, acc = [], math.nan
    for v in values:
        acc = v if math.isnan(acc) else (acc if math.isnan(v) else acc + alpha * (v - acc))
        out.append(acc)
    return out


# ------------------------------------------------------------------------------ figures


def _figure(panels: int, max_cols: int = 3, width: float = 5.2, height: float = 3.6):
    """A figure of ``panels`` axes, at most ``max_cols`` a row (the spare ones hidden), room for a legend below."""
    from matplotlib.figure import Figure

    ncols = min(panels, max_cols)
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), dpi=100, layout="constrained")
    axes = [ax for row in fig.subplots(nrows, ncols, squeeze=False) for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _curve(ax, run: Run, key: str, color, label: str | None, style: str = "-", train: bool = True,
           evals: bool = True, smooth: bool = True) -> bool:
    """Draw ``key`` of a run: train faint + smoothed, eval as markers. Returns whether anything was drawn."""
    drawn = False
    if train:
        steps, values = _series(run.train, key)
        if steps:
            if smooth and len(steps) > 20:
                ax.plot(steps, values, style, color=color, alpha=0.15, linewidth=0.8)
                values = _smooth(values)
            ax.plot(steps, values, style, color=color, linewidth=1.1, alpha=0.6 if evals else 1.0, label=label)
            drawn, label = True, None
    if evals:
        steps, values = _series(run.evals, f"eval_{key}")
        if steps:
            ax.plot(steps, values, style, color=color, marker="o", markersize=4.5, linewidth=1.9, label=label)
            drawn = True
    return drawn


def _run_legend(fig, runs: list[Run], colors: list[Any], extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2.5, label=_label(r)) for r, c in zip(runs, colors, strict=True)]
    handles += [Line2D([], [], color="0.3", label=text, **kw) for text, kw in extra]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False,
               fontsize="small")


def _label(run: Run) -> str:
    """The run's name and objective, once when the name already says it (``orpo λ=0.1``, not ``orpo (orpo λ=0.1)``).

    Dollar signs are escaped: matplotlib reads text between two of them as math, and fails on a bad formula;
    so is a lone surrogate (a folder name's undecodable byte), which its fonts refuse.
    """
    label = run.objective_label if run.name in run.objective_label else f"{run.name} ({run.objective_label})"
    return _utf8(label).replace("$", r"\$")


_TRAIN_EVAL: list[tuple[str, dict[str, Any]]] = [("train", {"linewidth": 1.1, "alpha": 0.6}),
                                                 ("eval", {"marker": "o", "markersize": 4.5, "linewidth": 1.9})]


def plot_logps(runs: list[Run], colors: list[Any]):
    """The paper's figure: chosen (solid) and rejected (dashed) log-probs of every run, then one panel per
    run with their change since step 0 on that run's own scale (one run falling fast would flatten the rest)."""
    use_eval = all(r.evals for r in runs)
    panels = 1 + len(runs)
    fig, axes = _figure(panels, max_cols={4: 2, 7: 4, 8: 4}.get(panels, 3))
    ax = axes[0]
    for i, (run, color) in enumerate(zip(runs, colors, strict=True)):
        rows, prefix = (run.evals, "eval_") if use_eval else (run.train, "")
        marker = {"marker": "o", "markersize": 3.5} if use_eval else {}
        dax = axes[1 + i]
        lines = {}
        for key, style in (("logps_chosen", "-"), ("logps_rejected", "--")):
            steps, values = _series(rows, prefix + key)
            if not steps:
                continue
            if not use_eval and len(values) > 20:
                values = _smooth(values)
            ax.plot(steps, values, style, color=color, linewidth=1.6, **marker)
            start = next((v for v in values if not math.isnan(v)), math.nan)
            lines[key] = (steps, [v - start for v in values])
            dax.plot(*lines[key], style, color=color, linewidth=1.8, **marker)
        if len(lines) == 2 and lines["logps_chosen"][0] == lines["logps_rejected"][0]:
            steps, dc = lines["logps_chosen"]
            dax.fill_between(steps, dc, lines["logps_rejected"][1], color=color, alpha=0.15, linewidth=0)
            dax.set_title(f"{_label(run)}\nΔ chosen {_fmt(dc[-1], True)}, Δ rejected "
                          f"{_fmt(lines['logps_rejected'][1][-1], True)}", fontsize="medium")
        else:
            dax.set_title(_label(run), fontsize="medium")
        dax.axhline(0.0, color="0.5", linewidth=0.8)
        dax.set_ylabel("Δ log P since step 0" if use_eval else "Δ log P since the first step")
    where = "eval set" if use_eval else "train batches, smoothed"
    ax.set_title(f"log-probs of chosen and rejected ({where})", fontsize="medium")
    ax.set_ylabel("mean log P(response token)")
    for a in axes:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    _run_legend(fig, runs, colors, [("chosen", {"linestyle": "-"}), ("rejected", {"linestyle": "--"})])
    return fig


def plot_loss(runs: list[Run], colors: list[Any]):
    """Loss (each objective's own total), the NLL of chosen (shared) and the objectives' own terms."""
    terms = [k for k in OWN_TERMS if any(k in r for run in runs for r in run.train)
             or any(f"eval_{k}" in r for run in runs for r in run.evals)]
    fig, axes = _figure(2 + len(terms), max_cols=2 if len(terms) == 2 else 3)
    keys = ["loss", "nll_loss", *terms]
    titles = {"loss": "loss (each objective's own)", "nll_loss": "NLL of chosen responses"}
    ylabels = {"loss": "loss", "nll_loss": "NLL (nats per chosen token)"}
    for ax, key in zip(axes, keys, strict=True):
        for run, color in zip(runs, colors, strict=True):
            _curve(ax, run, key, color, None)
        ax.set_title(titles.get(key, key))
        ax.set_ylabel(ylabels.get(key, f"{key} (per pair)"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _run_legend(fig, runs, colors, _TRAIN_EVAL)
    return fig


def plot_preference(runs: list[Run], colors: list[Any]):
    """Does the model prefer chosen: log odds ratio, accuracy (share of pairs) and margin, train and eval."""
    fig, axes = _figure(3)
    titles = {"log_odds_ratio": "log odds ratio (chosen vs rejected)", "accuracy": "accuracy (logp chosen > rejected)",
              "margin": "margin (logp chosen − rejected)"}
    ylabels = {"log_odds_ratio": "log odds(chosen) − log odds(rejected)", "accuracy": "share of pairs",
               "margin": "Δ mean log P(response token)"}
    for ax, key in zip(axes, titles, strict=True):
        for run, color in zip(runs, colors, strict=True):
            _curve(ax, run, key, color, None)
        ax.set_title(titles[key])
        ax.set_ylabel(ylabels[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].axhline(0.5, color="0.5", linewidth=0.8, linestyle=":")
    _run_legend(fig, runs, colors, _TRAIN_EVAL)
    return fig


def plot_optim(runs: list[Run], colors: list[Any]):
    """Learning rate and gradient norm (before clipping)."""
    fig, (lr_ax, gn_ax) = _figure(2)
    for run, color in zip(runs, colors, strict=True):
        _curve(lr_ax, run, "lr", color, None, evals=False, smooth=False)
        _curve(gn_ax, run, "grad_norm", color, None, evals=False)
    lr_ax.set_title("learning rate")
    lr_ax.set_ylabel("learning rate")
    gn_ax.set_title("gradient norm (before clipping)")
    gn_ax.set_ylabel("global L2 norm of the gradients")
    if any(v > 0 for run in runs for v in _series(run.train, "grad_norm")[1]):
        gn_ax.set_yscale("log")
    for a in (lr_ax, gn_ax):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    _run_legend(fig, runs, colors)
    return fig


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
    plots = {"logps": plot_logps, "loss": plot_loss, "preference": plot_preference, "optim": plot_optim}
    summaries = [run_summary(r) for r in runs]
    # the whole folder, published at once: a report is never half old, half new
    with disk.publish_owned(out_dir, "report", "orpo report --out", legacy=_legacy_report) as tmp:
        for name in FIGURES:
            fig = plots[name](runs, colors)
            fig.savefig(tmp / f"{name}.png", format="png")
            pngs[name] = (tmp / f"{name}.png").read_bytes()
        (tmp / "summary.json").write_text(_utf8(json.dumps(summaries, indent=2, ensure_ascii=False)), encoding="utf-8")
        (tmp / "report.html").write_text(_html(runs, summaries, pngs, colors), encoding="utf-8")
    return out_dir / "report.html"


def _legacy_report(folder: Path, names: list[str]) -> bool:
    """A report folder written before markers existed: nothing but a report's own files."""
    return set(names) <= {"report.html", "summary.json", *(f"{f}.png" for f in FIGURES)} and "report.html" in names


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


def _utf8(text: str) -> str:
    """``text`` that encodes as UTF-8: a lone surrogate (a JSON escape, or a folder name's undecodable byte) is ``?``."""
    return text.encode("utf-8", "replace").decode("utf-8")


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
    for name in FIGURES:
        data = base64.b64encode(pngs[name]).decode()
        out.append(f"<h2>{e(name)}</h2><p>{e(_CAPTIONS[name])}</p><img alt='{e(name)}' "
                   f"src='data:image/png;base64,{data}'>")
    for run, s in zip(runs, summaries, strict=True):
        out.append(f"<h2>Run {e(run.name)}</h2><p><code>{e(str(run.path))}</code> · {e(run.objective_label)} · "
                   f"{_fmt(s['steps'])} steps</p>")
        out.append(_eval_table(s))
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
