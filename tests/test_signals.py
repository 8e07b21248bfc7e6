"""Pre-emption: SIGTERM / SIGINT finish the step in flight, checkpoint, exit 4, and resume exactly.

The signals are real (``os.kill`` of this process, or of a torchrun process group) and go through
the real handlers; they are sent from a watcher or a forward hook so that they land at a known step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import TINY

import orpo.train.trainer as trainer_mod
from orpo.cli import main
from orpo.train import Watcher, list_checkpoints, read_metrics
from orpo.train import checkpoint as ckpt
from orpo.train.signals import StopOnSignal

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(path, stories_dir, hh_path, **train) -> str:
    raw = {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12},
        "train": {"output_dir": str(path.parent / "run"), "max_steps": 5, "batch_size": 2, "grad_accum": 2,
                  "learning_rate": 1e-3, **train},
    }
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class SignalInStep(Watcher):
    """Send ``sig`` to this process from inside the first forward of step ``after + 1`` (``times`` times)."""

    def __init__(self, after: int, sig=signal.SIGTERM, times: int = 1):
        self.after, self.sig, self.times, self.forwards = after, sig, times, []

    def on_start(self, trainer):
        def hook(module, args):
            self.forwards.append(trainer.state.step)
            if trainer.state.step == self.after and self.forwards.count(self.after) == 1:
                for _ in range(self.times):
                    os.kill(os.getpid(), self.sig)
        trainer.engine.unwrap(trainer.model).register_forward_pre_hook(hook)


def _with_watcher(monkeypatch, watcher):
    real = trainer_mod.build_watchers
    monkeypatch.setattr(trainer_mod, "build_watchers", lambda cfg: [*real(cfg), watcher])


def test_sigterm_finishes_the_step_checkpoints_exits_4_and_resumes_exactly(tmp_path, stories_dir, hh_path,
                                                                           monkeypatch, capfd):
    ref = _config(tmp_path / "ref.yaml", stories_dir, hh_path, output_dir=str(tmp_path / "ref"))
    assert main(["train", ref]) == 0

    cfg = _config(tmp_path / "cfg.yaml", stories_dir, hh_path)
    out = tmp_path / "run"
    watcher = SignalInStep(after=2)
    _with_watcher(monkeypatch, watcher)
    before = signal.getsignal(signal.SIGTERM)
    capfd.readouterr()
    assert main(["train", cfg]) == 4
    err = capfd.readouterr().err
    assert "SIGTERM received: stopping after the current step" in err
    assert err.strip().splitlines()[-1] == (
        f"orpo train: stopped at step 3 of 5: SIGTERM received; resume with train.resume=auto "
        f"(from {out / 'checkpoints' / 'step-3'})")
    # the signal came during step 3's first micro-batch: both micro-batches ran, the step was taken
    assert watcher.forwards == [0, 0, 1, 1, 2, 2]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(out)] == ["step-3"]
    assert ckpt.inspect_checkpoint(out / "checkpoints" / "step-3").complete
    assert ckpt.read_state(out / "checkpoints" / "step-3").step == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone with the run

    monkeypatch.undo()
    assert main(["train", cfg, "train.resume=auto"]) == 0
    final, reference = load_file(str(out / "final" / "model.safetensors")), load_file(
        str(tmp_path / "ref" / "final" / "model.safetensors"))
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)  # fp32 CPU: bit for bit
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("on_signal", "save_every", "written"), [(False, None, []), (False, 10, ["step-2"]),
                                                                  (True, None, ["step-2"])])
def test_checkpoint_on_signal_decides_whether_a_stop_writes_a_checkpoint(tmp_path, stories_dir, hh_path, monkeypatch,
                                                                       capsys, on_signal, save_every, written):
    cfg = _config(tmp_path / "cfg.yaml", stories_dir, hh_path, checkpoint_on_signal=on_signal, save_every=save_every,
                  max_steps=3, grad_accum=1)
    _with_watcher(monkeypatch, SignalInStep(after=1))
    assert main(["train", cfg]) == 4
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == written
    last = capsys.readouterr().err.strip().splitlines()[-1]
    if written:
        assert last.endswith(f"SIGTERM received; resume with train.resume=auto (from {tmp_path}/run/checkpoints/step-2)")
    else:
        assert last == ("orpo train: stopped at step 2 of 3: SIGTERM received (train.checkpoint_on_signal is false); "
                        "no checkpoint was written")
        assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(("relay_s", "status"), [(0.0, 130), (60.0, 4)])
def test_a_second_ctrl_c_aborts_at_once_but_a_relayed_copy_does_not(tmp_path, stories_dir, hh_path, monkeypatch,
                                                                    relay_s, status):
    cfg = _config(tmp_path / "cfg.yaml", stories_dir, hh_path, save_every=1, max_steps=3, grad_accum=1)
    monkeypatch.setattr(StopOnSignal, "RELAY_S", relay_s)
    _with_watcher(monkeypatch, SignalInStep(after=1, sig=signal.SIGINT, times=2))
    assert main(["train", cfg]) == status
    # aborted in step 2: its checkpoint was never written; stopped: written after the step
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == (["step-1"] if status == 130 else
                                                                     ["step-1", "step-2"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo): one rank signalled, then the whole process group

SCRIPT = """
import json, os, signal, sys, time
import orpo.train.trainer as trainer_mod
from orpo.cli import main
from orpo.train import Watcher
from orpo.train.signals import StopOnSignal

send = json.loads(sys.argv[2])

class Send(Watcher):
    def on_step(self, trainer, row):
        if trainer.state.step == send["step"] and trainer.accelerator.process_index == send["rank"]:
            if send["launcher"]:  # torchrun passes it on to every worker; wait until it has reached this one
                os.kill(os.getppid(), signal.SIGTERM)
                stop = next(w for w in trainer.watchers if isinstance(w, StopOnSignal))
                deadline = time.monotonic() + 20
                while stop.received is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                os.kill(os.getpid(), signal.SIGTERM)

real = trainer_mod.build_watchers
trainer_mod.build_watchers = lambda cfg: [*real(cfg), Send()]
sys.exit(main(["train", sys.argv[1], *sys.argv[3:]]))
"""


def _torchrun(tmp_path, cfg, send, *overrides):
    script = tmp_path / "send.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), cfg, json.dumps(send), *overrides], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_every_rank_stops_at_the_same_step_when_one_rank_or_the_launcher_is_signalled(tmp_path, stories_dir,
                                                                                      hh_path):
    cfg = _config(tmp_path / "cfg.yaml", stories_dir, hh_path, batch_size=1, grad_accum=1, max_steps=6)
    out = tmp_path / "run"

    # SIGTERM to rank 1 only, after step 2: the ranks agree at the next boundary, write the step-3
    # checkpoint together, and exit 4 (torchrun sends SIGTERM to a rank still exiting when another
    # has exited first: -15 then, after the checkpoint).
    proc = _torchrun(tmp_path, cfg, {"rank": 1, "step": 2, "launcher": False})
    assert "stopped at step 3 of 6: SIGTERM received by rank 1; resume with train.resume=auto" in proc.stderr, (
        proc.stderr[-3000:])
    codes = re.findall(r"exitcode\s+: (-?\d+)", proc.stderr)
    assert "4" in codes and set(codes) <= {"4", "-15"}, proc.stderr[-3000:]
    status = ckpt.inspect_checkpoint(out / "checkpoints" / "step-3")
    assert status.complete and status.num_processes == 2
    assert {p.name for p in (out / "checkpoints" / "step-3").glob("rng_state_*.pt")} == {"rng_state_0.pt",
                                                                                         "rng_state_1.pt"}

    # SIGTERM to the launcher (as a container runtime sends it to its first process) after step 4 of
    # the resumed run: torchrun passes it on to every worker; they stop together after step 5.
    proc = _torchrun(tmp_path, cfg, {"rank": 0, "step": 4, "launcher": True}, "train.resume=auto")
    assert "resumed from" in proc.stderr and "(step 3)" in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"stopped at step 5 of 6: SIGTERM received by (every process|rank \d); resume with "
                     r"train.resume=auto", proc.stderr), proc.stderr[-3000:]
    assert "SignalException: Process" in proc.stderr and "got signal: 15" in proc.stderr  # the launcher's own
    assert [p.name for p in list_checkpoints(out)] == ["step-3", "step-5"]
    assert ckpt.inspect_checkpoint(out / "checkpoints" / "step-5").complete
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
