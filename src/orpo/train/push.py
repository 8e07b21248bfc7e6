"""``train.push_to_hub``: the run's model on the Hugging Face Hub, as a ``Watcher``.

The token and the repo are checked when the run is set up (``on_setup``, before the run folder is
touched), so a missing token or a refused repo stops the run before it trains. ``hub_strategy: end``
pushes ``final/`` once, after it is saved; a failed final push raises ``PushFailed`` (the run
itself is finished and saved; ``orpo push`` sends it later). ``every_save`` also pushes the model
at each checkpoint, inline: every rank writes the model (as ``final/`` would hold it at that step)
into a temporary folder outside the run folder, the main process pushes it and removes it; a failed
checkpoint push is reported and the run goes on; the checkpoint of a stopping run (SIGTERM) is not
pushed. Only the main process talks to the hub.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo import hub
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer, TrainResult


class HubPush(Watcher):
    def __init__(self, repo: str, private: bool, strategy: str):
        self.repo, self.private, self.strategy = repo, private, strategy
        self.token: str | None = None
        self.pushed: list[int] = []  # steps whose checkpoint model was pushed
        self.failed: list[str] = []

    def on_setup(self, trainer: Trainer) -> None:
        try:
            self.token = hub.hub_token()  # every rank: no network, the same answer everywhere
            if trainer.is_main:
                hub.create_repo(self.repo, private=self.private, token=self.token)
        except hub.HubError as e:
            raise hub.HubError(f"train.push_to_hub: {e}") from e

    def on_save(self, trainer: Trainer, path: Any) -> None:
        # a checkpoint written because the run is stopping (SIGTERM: pre-emption) is not held up by an
        # upload; the last step's model is pushed once, as final/, at the end
        if self.strategy != "every_save" or trainer.stop_request is not None or trainer.state.step >= trainer.total_steps:
            return
        step = trainer.state.step
        scratch = Path(tempfile.mkdtemp(prefix=f"orpo-push-step-{step}-"))
        try:
            folder = trainer.save_model(scratch / "model", eval_row=trainer.last_eval, in_run=False)
            if trainer.is_main:
                try:
                    hub.push_folder(folder, self.repo, private=self.private, token=self.token,
                                    message=f"orpo train: step {step}")
                    self.pushed.append(step)
                except hub.PushFailed as e:
                    self.failed.append(f"step {step}: {e}")
                    print(f"orpo train: warning: pushing the model of step {step} to {self.repo}: {e}", file=sys.stderr)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        if not trainer.is_main or result.final_dir is None:
            return
        try:
            pushed = hub.push_folder(result.final_dir, self.repo, private=self.private, token=self.token,
                                     message=f"orpo train: final model, step {trainer.state.step}")
        except hub.PushFailed as e:
            raise hub.PushFailed(f"the run finished and {result.final_dir} is saved, but {e}; push it with `orpo "
                                 f"push {result.final_dir} --repo {self.repo}`") from e
        if self.pushed:
            result.notes.append(f"hub pushes     checkpoint models of steps {', '.join(map(str, self.pushed))}")
        if self.failed:
            result.notes.append(f"hub failures   {len(self.failed)} checkpoint pushes failed: {self.failed[0]}")
        result.notes.append(f"hub            {pushed.describe(self.repo, None)}")
