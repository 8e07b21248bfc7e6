"""Pre-emption: SIGTERM or SIGINT stops a run after its current optimizer step, with a checkpoint.

Spot and pre-emptible machines send SIGTERM and allow a grace period before a SIGKILL; Ctrl-C sends
SIGINT. ``StopOnSignal`` turns the first of either into a request: the step in flight finishes, a
checkpoint is written (``train.checkpoint_on_signal`` or ``train.save_every``), and the run ends with
``TrainingStopped`` (``orpo train`` exits with status 4 and says how to resume). A second SIGINT
raises ``KeyboardInterrupt`` at once (status 130): Ctrl-C twice always works. A repeated SIGTERM
changes nothing, and neither does a SIGINT within ``RELAY_S`` of the first signal: launchers
(torchrun) pass on to their workers the very Ctrl-C the terminal has already sent them.

Under several processes the signal may reach one rank only (or the ranks at different steps), and a
rank that stops alone leaves the others waiting in a collective forever: at every step boundary
the ranks sum who received what, so all of them stop after the same step and write the checkpoint
together. The handlers are installed when the loop starts and the previous ones are put back when
it ends, however it ends; a signal the process ignores (``nohup``, ``cmd &``) stays ignored, and a run
outside the main thread (where Python allows no handlers) keeps the defaults.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(Watcher):
    """Stop after the current step on SIGTERM / SIGINT, every rank at the same step."""

    RELAY_S = 1.0  # a SIGINT this soon after the first signal is a launcher's copy of it, not a second Ctrl-C

    def __init__(self, checkpoint: bool):
        self.checkpoint = checkpoint
        self.received: signal.Signals | None = None
        self._first_at = 0.0
        self._previous: dict[signal.Signals, Any] = {}

    def on_start(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            # `nohup` and `cmd &` ignore some on purpose: those stay ignored
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_close(self, trainer: Trainer) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Only sets a flag (a handler runs between two bytecodes, anywhere in the loop)."""
        sig, now = signal.Signals(signum), time.monotonic()
        if self.received is None:
            self.received, self._first_at = sig, now
            # os.write, not print: a handler may interrupt a print to the same stream
            os.write(2, f"\n{sig.name} received: stopping after the current step"
                        f"{' (Ctrl-C again to abort at once)' if sig == signal.SIGINT else ''}\n".encode())
        elif sig == signal.SIGINT and now - self._first_at > self.RELAY_S:
            raise KeyboardInterrupt

    def on_step(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        acc = trainer.accelerator
        if acc.num_processes == 1:
            reason = f"{self.received.name} received" if self.received is not None else None
        else:
            # one collective per step: which rank got which signal (0: none), summed over ranks
            got = torch.zeros(acc.num_processes, device=acc.device)
            got[acc.process_index] = int(self.received or 0)
            ranks = {rank: signal.Signals(int(s)).name for rank, s in enumerate(acc.reduce(got, "sum").tolist()) if s}
            if len(ranks) == acc.num_processes and len(set(ranks.values())) == 1:
                reason = f"{next(iter(ranks.values()))} received by every process"
            else:
                reason = ", ".join(f"{name} received by rank {rank}" for rank, name in ranks.items()) or None
        if reason is not None:
            save = self.checkpoint or trainer.cfg.train.save_every is not None
            trainer.request_stop(reason if save else f"{reason} (train.checkpoint_on_signal is false)",
                                 checkpoint=save)

