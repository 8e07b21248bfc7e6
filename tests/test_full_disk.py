"""A disk that fills up (or fails) during a save: the previous checkpoint stays, nothing half-written is
left, and the run stops with one message naming the path and the space needed (exit status 5).

The full disk is ``faults.disk.FullDisk``: ``open()`` whose writes fail with ENOSPC after N bytes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from faults.disk import FullDisk
from tiny import TINY

import orpo.train.trainer as trainer_mod
from orpo.cli import main
from orpo.config import DataConfig
from orpo.data import prepare_data
from orpo.train import Watcher, list_checkpoints, read_metrics
from orpo.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, stories_dir, hh_path, **train) -> str:
    raw = {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "learning_rate": 1e-3,
                  "save_every": 2, **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class DiskFillsAt(Watcher):
    """The disk is full from the end of step ``step`` on (every write to a path containing ``match``)."""

    def __init__(self, step: int, disk: FullDisk):
        self.step, self.disk = step, disk

    def on_step(self, trainer, row):
        if trainer.state.step == self.step:
            self.disk.__enter__()

    def on_close(self, trainer):
        self.disk.__exit__()


def _with_full_disk(monkeypatch, step, disk):
    real = trainer_mod.build_watchers
    monkeypatch.setattr(trainer_mod, "build_watchers", lambda cfg: [DiskFillsAt(step, disk), *real(cfg)])


def _leftovers(folder):
    """Temporary names left behind (the run folder's marker and lock are not leftovers)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in (".orpo.json", ".orpo.lock"))


@pytest.mark.parametrize(("match", "after_bytes"), [
    ("__0_0.distcp", 1000),  # inside the model/optimizer state that torch.distributed.checkpoint writes
    ("trainer_state.json", 0),  # the last file before the manifest
    ("manifest.json", 10),  # the commit point itself
])
def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one_and_exits_5(tmp_path, stories_dir, hh_path, monkeypatch,
                                                                        capsys, match, after_bytes):
    cfg = _config(tmp_path, stories_dir, hh_path)
    out = tmp_path / "run"
    disk = FullDisk(after_bytes=after_bytes, match=match)
    _with_full_disk(monkeypatch, 3, disk)  # the step-2 save succeeds, the step-4 one fails
    assert main(["train", cfg]) == 5
    assert disk.failed and match in disk.failed[0]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    step2, step4 = out / "checkpoints" / "step-2", out / "checkpoints" / "step-4"
    size = sum(e["size"] for e in json.loads((step2 / "manifest.json").read_text())["files"].values())
    assert err.startswith(f"orpo train: error: could not write checkpoint {step4} ([Errno 28] No space left on "
                          f"device: '{step4}/")
    m = re.search(r"it needs about ([\d.,]+) MiB \(the size of step-2\) and ([\d.,]+) MiB are free on that disk", err)
    assert m and float(m.group(1)) == round(size / 2**20, 1)
    assert err.endswith(f"nothing new was published at {step4}, and the newest checkpoint, {step2}, is intact: free "
                        "some space, then resume with train.resume=auto")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # no unfinished folder, no temporary
    assert ckpt.inspect_checkpoint(step2).complete and not (out / "final").exists()

    monkeypatch.undo()
    assert main(["train", cfg, "train.resume=auto"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-4"]


def test_an_io_error_is_named_as_one(tmp_path, stories_dir, hh_path, monkeypatch, capsys):
    cfg = _config(tmp_path, stories_dir, hh_path)
    _with_full_disk(monkeypatch, 1, FullDisk(after_bytes=0, match="step-2", error=errno.EIO))
    assert main(["train", cfg]) == 5
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "([Errno 5] Input/output error" in err and "an I/O error, the disk may be failing" in err
    assert err.endswith("there is no checkpoint to resume from (train.save_every keeps some): free some space and "
                        "start over")
    assert ckpt.step_folders(tmp_path / "run") == []


def test_a_final_save_on_a_full_disk_leaves_no_partial_folder_and_resume_writes_it(tmp_path, stories_dir, hh_path,
                                                                                   monkeypatch, capsys):
    cfg = _config(tmp_path, stories_dir, hh_path)
    out = tmp_path / "run"
    disk = FullDisk(after_bytes=2000, match="final")  # the model (safetensors, native) is written; its tokenizer is not
    _with_full_disk(monkeypatch, 4, disk)
    assert main(["train", cfg]) == 5
    assert disk.failed and "/.final.tmp/" in disk.failed[0]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"orpo train: error: could not write the model {out / 'final'} ([Errno 28] No space left")
    assert re.search(r"it needs about [\d.]+ MiB \(its weights\) and [\d.,]+ MiB are free on that disk", err)
    assert err.endswith(f"the newest checkpoint, {out / 'checkpoints' / 'step-4'}, is intact: free some space, then "
                        "resume with train.resume=auto")
    assert not (out / "final").exists() and _leftovers(out) == []

    monkeypatch.undo()
    assert main(["train", cfg, "train.resume=auto"]) == 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert _leftovers(out) == []


def test_the_data_cache_is_never_left_half_written(tmp_path, hh_path, stories_tokenizer):
    cfg = DataConfig(train=str(hh_path), max_length=64, max_samples=40, cache_dir=str(tmp_path / "cache"))
    with FullDisk(after_bytes=3000, match=str(tmp_path / "cache")) as disk:
        prepared = prepare_data(cfg, stories_tokenizer, chat_template="none")
    assert disk.failed  # the cache write ran out of space part-way
    assert list((tmp_path / "cache").iterdir()) == []  # neither the entry nor its temporary folder
    assert not prepared.from_cache and prepared.cache_path is None and len(prepared.train) == 40

    again = prepare_data(cfg, stories_tokenizer, chat_template="none")  # room again: cached as usual
    assert again.cache_path is not None and [p.name for p in (tmp_path / "cache").iterdir()] == [again.cache_path.name]
    assert again.train["chosen_input_ids"] == prepared.train["chosen_input_ids"]
    assert prepare_data(cfg, stories_tokenizer, chat_template="none").from_cache


def _tmpfs_mountable(where) -> bool:
    """A tmpfs in a user namespace (no root needed where the kernel allows user namespaces)."""
    where.mkdir()
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_really_full_tmpfs_stops_the_run_with_the_same_message(tmp_path, stories_dir, hh_path):
    """The kernel's own ENOSPC, on a tmpfs that holds one checkpoint but not two. (On a full disk
    torch.save inside torch.distributed.checkpoint fails with a RuntimeError, not an OSError.)"""
    if not _tmpfs_mountable(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs here (no user namespaces)")
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    cfg = _config(tmp_path, stories_dir, hh_path, output_dir=str(disk / "run"), save_total_limit=3)
    # inside the namespace: mount, train, keep a copy of what the full disk holds (the mount dies with it)
    script = (f'mount -t tmpfs -o size=1200k tmpfs {disk} && "$@"; rc=$?; cp -a {disk}/run {copy}; exit $rc')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           sys.executable, "-m", "orpo.cli", "train", cfg], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 5, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    step2, step4 = disk / "run" / "checkpoints" / "step-2", disk / "run" / "checkpoints" / "step-4"
    assert err.startswith(f"orpo train: error: could not write checkpoint {step4} ([Errno 28] No space left on device")
    assert re.search(r"it needs about [\d.]+ MiB \(the size of step-2\) and 0\.\d MiB are free on that disk", err)
    assert err.endswith(f"the newest checkpoint, {step2}, is intact: free some space, then resume with "
                        "train.resume=auto")
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["step-2"]
    assert ckpt.inspect_checkpoint(copy / "checkpoints" / "step-2").complete


def test_a_metrics_row_on_a_full_disk_is_taken_back_and_exits_5(tmp_path, stories_dir, hh_path, monkeypatch, capsys):
    cfg = _config(tmp_path, stories_dir, hh_path)
    out = tmp_path / "run"
    disk = FullDisk(after_bytes=40, match="metrics.jsonl")  # 40 bytes of the step-3 row reach the disk
    _with_full_disk(monkeypatch, 2, disk)
    assert main(["train", cfg]) == 5
    assert disk.failed == [str(out / "metrics.jsonl")]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"orpo train: error: could not write the metrics {out / 'metrics.jsonl'} ([Errno 28] No "
                          "space left on device")
    assert re.search(r"\): [\d.,]+ MiB are free on that disk; ", err)
    assert err.endswith(f"the newest checkpoint, {out / 'checkpoints' / 'step-2'}, is intact: free some space, "
                        "then resume with train.resume=auto")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # every line whole: the cut row was taken back

    monkeypatch.undo()
    assert main(["train", cfg, "train.resume=auto"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_a_full_disk_outside_a_save_is_one_line_and_exit_5(tmp_path, stories_dir, hh_path, capsys):
    cfg = _config(tmp_path, stories_dir, hh_path)
    with FullDisk(after_bytes=0, match="config.yaml"):
        assert main(["train", cfg]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"orpo train: error: the disk is full ([Errno 28] No space left on device: "
                       f"'{tmp_path / 'run' / 'config.yaml'}'): free some space and run it again (train.resume=auto "
                       "goes on from the newest checkpoint)")
    assert not any("Traceback" in line for line in err)


TWO_RANKS = """
import atexit, json, os, sys
def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    # one write(2) per rank, so the ranks' lines never interleave (PYTHONUNBUFFERED makes print write in parts)
    os.write(1, f"gloo threads at exit: {[n for n in names if 'gloo' in n]}\\n".encode())
atexit.register(gloo_threads)
from faults.disk import FullDisk
import orpo.train.trainer as trainer_mod
from orpo.cli import main
from orpo.train import Watcher

class FillsOnRank1(Watcher):
    def __init__(self):
        self.disk = FullDisk(after_bytes=0, match="rng_state_1.pt")

    def on_step(self, trainer, row):
        if trainer.state.step == 3 and trainer.accelerator.process_index == 1:
            self.disk.__enter__()

    def on_close(self, trainer):
        self.disk.__exit__()

real = trainer_mod.build_watchers
trainer_mod.build_watchers = lambda cfg: [FillsOnRank1(), *real(cfg)]
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_a_full_disk_on_one_rank_stops_every_rank_with_one_message(tmp_path, stories_dir, hh_path):
    """Rank 1 cannot write its part of the step-4 checkpoint: both ranks leave the save together
    (no rank waits in a collective), exit 5, and the step-2 checkpoint is what is left."""
    cfg = _config(tmp_path, stories_dir, hh_path)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), cfg], env=env, capture_output=True, text=True, timeout=300)
    out = tmp_path / "run"
    step2, step4 = out / "checkpoints" / "step-2", out / "checkpoints" / "step-4"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("orpo train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]  # said once, by rank 0, for both
    assert lines[0].startswith(f"orpo train: error: could not write checkpoint {step4} (rank 1: [Errno 28] No space "
                               f"left on device: '{step4}/")
    assert lines[0].endswith(f"the newest checkpoint, {step2}, is intact: free some space, then resume with "
                             "train.resume=auto")
    codes = re.findall(r"exitcode\s+: (-?\d+)", proc.stderr)
    assert "5" in codes and set(codes) <= {"5", "-15"}, proc.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert ckpt.inspect_checkpoint(step2).complete and not (out / "final").exists()
    # the failed run's model sits in a reference cycle: the process group is ended all the same (see
    # test_train_ddp), or a gloo thread may abort one rank at interpreter teardown
    assert proc.stdout.count("gloo threads at exit: []") == 2, proc.stdout[-2000:]
