"""The figures of ``orpo report``: matplotlib's object API on an Agg canvas (no pyplot state), one
function per PNG, each drawing every run in its own colour.

    loss.png        loss, NLL and each objective's own terms (or_loss, simpo_loss, ...)
    logps.png       chosen and rejected log-probs, and their change since step 0
    preference.png  log odds ratio, accuracy and margin, train and eval
    optim.png       learning rate and gradient norm
    benchmarks.png  the train.benchmark_tasks metrics (bench_*), one panel each, with lm-eval's
                    standard errors: only when a run has them
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orpo.report import Run

# each objective's own loss terms, drawn next to loss and NLL
OWN_TERMS = ("or_loss", "simpo_loss", "cpo_loss", "dpo_loss")
BENCH_PREFIX = "bench_"


def _finite(v: Any) -> bool:
    """A number a figure can draw (an integer too large for a float is not one)."""
    try:
        return isinstance(v, int | float) and math.isfinite(v)
    except OverflowError:
        return False


def _utf8(text: str) -> str:
    """``text`` that encodes as UTF-8: a lone surrogate (a JSON escape, or a folder name's undecodable byte) is ``?``."""
    return text.encode("utf-8", "replace").decode("utf-8")


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
            dax.set_title(f"{_label(run)}\nΔ chosen {dc[-1]:+.3f}, Δ rejected "
                          f"{lines['logps_rejected'][1][-1]:+.3f}", fontsize="medium")
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


def bench_metrics(runs: list[Run]) -> list[str]:
    """The ``bench_<task>_<metric>`` names any run logged, in first-seen order (not their ``_stderr``)."""
    names: dict[str, None] = {}
    for run in runs:
        for row in run.benchmarks:
            names.update((k, None) for k in row if k.startswith(BENCH_PREFIX) and not k.endswith("_stderr")
                         and k != "bench_seconds")
    return list(names)


def plot_benchmarks(runs: list[Run], colors: list[Any]):
    """Each benchmark metric over the steps it was run at, a panel each, error bars from lm-eval's stderr:
    beside the preference metrics, whether the model keeps what it knew (the ``forgetting`` warning)."""
    metrics = bench_metrics(runs)
    fig, axes = _figure(max(1, len(metrics)))
    for ax, key in zip(axes, metrics, strict=False):
        for run, color in zip(runs, colors, strict=True):
            rows = [r for r in run.benchmarks if _finite(r.get(key))]
            if not rows:
                continue
            errs = [r.get(f"{key}_stderr") if _finite(r.get(f"{key}_stderr")) else 0.0 for r in rows]
            ax.errorbar([r["step"] for r in rows], [r[key] for r in rows], yerr=errs, color=color, marker="o",
                        markersize=4.5, linewidth=1.6, capsize=3)
        ax.set_title(_utf8(key.removeprefix(BENCH_PREFIX)), fontsize="medium")
        ax.set_ylabel("score")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _run_legend(fig, runs, colors)
    return fig
