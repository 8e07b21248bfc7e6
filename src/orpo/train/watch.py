"""What watches a run plugs into the loop here: one small interface, a few fixed moments.

The recipe (``Trainer.train``) stays a plain loop; health warnings, eval generations, the best
checkpoint, signal handling and the like are ``Watcher`` objects the trainer calls at fixed
moments. A watcher may read the trainer (model, tokenizer, state, config), write through it
(``trainer.log``, ``trainer.warn``) and ask it to stop (``trainer.request_stop``) or to end
normally early (``trainer.request_finish``, early stopping); it never
drives the loop itself. Every rank calls every watcher (a watcher that needs a collective, such as
saving a sharded model, can do it); only writes to files are main-process only, through the
trainer's own helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orpo.config import Config
    from orpo.train.trainer import Trainer, TrainResult


class Watcher:
    """A no-op at every moment; subclasses override what they need."""

    def on_setup(self, trainer: Trainer) -> None:
        """At the end of setup, before the run folder is touched: read and check the watcher's own
        inputs here, so a bad one stops the run with the previous one intact."""

    def on_start(self, trainer: Trainer) -> None:
        """After setup and the resume, before the step-0 eval."""

    def on_step(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        """After each optimizer step and its logging (``row`` is None on steps that log nothing)."""

    def eval_metrics(self, trainer: Trainer) -> dict[str, float]:
        """Extra ``eval_*`` metrics for the eval row being built (same on every rank), before it is logged."""
        return {}

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After each evaluation; ``row`` holds ``step`` and the ``eval_*`` metrics, already logged."""

    def on_finish(self, trainer: Trainer) -> None:
        """After the last step and the final eval, before ``final/`` is written (its model card)."""

    def on_save(self, trainer: Trainer, path: Any) -> None:
        """After a checkpoint was written (every rank) to ``path``."""

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the final save, before the summary is printed (a watcher may add ``result.notes``)."""

    def on_close(self, trainer: Trainer) -> None:
        """Last, however the run ends (finished, stopped, failed): give back what ``on_start`` took."""


@dataclass
class StepCallback(Watcher):
    """A plain function called after every step (tests use it to interrupt a run at a given step)."""

    fn: Callable[[Trainer], None]

    def on_step(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        self.fn(trainer)


def build_watchers(cfg: Config) -> list[Watcher]:
    """The watchers a run's config asks for, in the order they are called: register new ones here."""
    from orpo.train import health

    watchers: list[Watcher] = health.build(cfg)  # general_eval (adds eval_general_ppl), health warnings, save_best
    if cfg.train.early_stopping is not None:
        from orpo.train import early_stop

        watchers += early_stop.build(cfg)
    if cfg.train.benchmark_tasks:
        from orpo.train import benchmarks

        watchers += benchmarks.build(cfg)
    if cfg.train.eval_generate:
        from orpo.train.samples import EvalSamples

        watchers.append(EvalSamples(cfg.train.eval_generate, cfg.train.eval_generate_max_tokens))
    from orpo.train.signals import StopOnSignal

    # SIGTERM / SIGINT: stop after this step
    watchers.append(StopOnSignal(cfg.train.checkpoint_on_signal))
    if cfg.train.push_to_hub and cfg.train.hub_model_id:
        from orpo.train.push import HubPush

        # last: on_end pushes final/ after every other watcher has had its say (best/, notes)
        watchers.append(HubPush(cfg.train.hub_model_id, cfg.train.hub_private, cfg.train.hub_strategy))
    return watchers
