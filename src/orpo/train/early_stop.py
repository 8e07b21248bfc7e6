"""``train.early_stopping``: end a run whose eval metric stopped improving, keeping its best model.

After each eval, ``EarlyStop`` compares the metric with the best value so far: a value better by
more than ``threshold`` resets the count of evals without improvement, anything else (a smaller
gain, a loss, a non-finite value) adds one; at ``patience`` the trainer is asked to finish, which
it does as at its last step (final eval, ``final/``, summary, exit status 0), with a line in the
summary. The best value follows every strict improvement, as ``best/`` does, so the line names the
model ``best/`` holds (``BestCheckpoint``, which early stopping adds for its own metric and
direction when ``train.save_best`` is unset). The record lives in ``state.watchers``, so it is in
every checkpoint and a resumed run counts on exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from orpo.config import Config, ConfigError, EarlyStoppingConfig
from orpo.train.health import BestCheckpoint
from orpo.train.objective import MetricSums
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer, TrainResult

KEY = "early_stopping"


class EarlyStop(Watcher):
    """Counts evals without an improvement of ``cfg.metric``; asks the trainer to finish at ``patience``."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg, self.goal = cfg, cfg.goal()
        self.stopped = False

    def on_setup(self, trainer: Trainer) -> None:
        """The metric is checked here, before any training (eval data itself is train.eval_every's to need)."""
        names = eval_metric_names(trainer)
        if self.cfg.metric not in names:
            raise ConfigError(f"train.early_stopping.metric: this run has no eval metric '{self.cfg.metric}' "
                              f"(it has: {', '.join(names)})")

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        value = row.get(self.cfg.metric)
        rec = trainer.state.watchers.get(KEY)
        if rec is None or rec["metric"] != self.cfg.metric:
            # the first eval (or another metric after a resume): the baseline
            rec = trainer.state.watchers[KEY] = {"metric": self.cfg.metric, "value": None, "step": None, "bad": 0}
        finite = value is not None and math.isfinite(value)
        best = rec["value"]
        if finite and best is None:
            rec.update(value=value, step=row["step"], bad=0)
            return
        gain = (best - value if self.goal == "min" else value - best) if finite else -math.inf
        rec["bad"] = 0 if gain > self.cfg.threshold else rec["bad"] + 1
        if gain > 0:
            rec.update(value=value, step=row["step"])
        if rec["bad"] >= self.cfg.patience and not self.stopped:
            self.stopped = True
            trainer.request_finish(self.reason(rec))

    def reason(self, rec: dict[str, Any]) -> str:
        best = "no finite value" if rec["value"] is None else f"best {rec['value']:.4f} at step {rec['step']}"
        return (f"{self.cfg.metric} did not improve by more than {self.cfg.threshold} for {rec['bad']} evals; "
                f"{best}")

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self.stopped:
            result.notes.append(f"early stopping: {self.reason(trainer.state.watchers[KEY])}")


class EarlyStopBest(BestCheckpoint):
    """``best/`` for early stopping's metric and direction, when ``train.save_best`` is unset (the direction
    may be ``mode``'s, for a metric ``save_best`` could not name)."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.metric, self.goal = cfg.metric, cfg.goal()


def eval_metric_names(trainer: Trainer) -> list[str]:
    """The ``eval_*`` keys every eval row of this run will hold, known before the first eval."""
    sums = MetricSums(trainer.objective, "cpu")
    names = ["loss", *sums.keys, *MetricSums.COUNTS]
    if trainer.cfg.data.general_eval:
        names.append("general_ppl")
    return [f"eval_{n}" for n in names]


def build(cfg: Config) -> list[Watcher]:
    """The watchers ``train.early_stopping`` asks for, in calling order."""
    es = cfg.train.early_stopping
    if es is None:
        return []
    # a set save_best names the same metric (TrainConfig checks): its watcher already keeps best/
    best = [] if cfg.train.save_best else [EarlyStopBest(es)]
    return [*best, EarlyStop(es)]
