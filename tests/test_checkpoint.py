"""Checkpoint integrity: the manifest, damaged and incomplete checkpoints at resume, `orpo checkpoints`,
and which process-count changes a resume accepts."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import pytest
import yaml
from rich.console import Console
from tiny import TINY

from orpo.cli import main
from orpo.config import load_config
from orpo.train import ResumeError, Trainer, list_checkpoints, read_metrics, resume
from orpo.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, stories_dir, hh_path, **train):
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 8},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "save_every": 1,
                  "save_total_limit": 4, **train},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories_dir, hh_path):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(_cfg(out, stories_dir, hh_path), progress=False).setup().train()
    return out


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _damage(path, offset_fraction=0.5):
    """Overwrite 64 bytes in the middle of a file, as a failing disk or an interrupted copy would."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at : at + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_the_manifest_lists_every_file_with_its_size_and_sha256(run):
    folder = run / "checkpoints" / "step-4"
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == files
    assert {"state/.metadata", "state/__0_0.distcp", "rng_state_0.pt", "trainer_state.json"} <= files
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (manifest["step"], manifest["num_processes"], manifest["engine"]) == (4, 1, "single")
    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-2", "step-3", "step-4"]


def test_a_damaged_newest_checkpoint_is_named_and_skipped(run, tmp_path, stories_dir, hh_path):
    out = _copy(run, tmp_path)
    damaged = _largest(out / "checkpoints" / "step-4")
    _damage(damaged)
    status = ckpt.inspect_checkpoint(out / "checkpoints" / "step-4")
    rel = str(damaged.relative_to(out / "checkpoints" / "step-4"))
    assert status.state == "damaged" and rel in status.problem and "sha256" in status.problem
    # a shortened file is caught by its size alone, without reading it
    (out / "checkpoints" / "step-3" / "rng_state_0.pt").write_bytes(b"x")
    quick = ckpt.inspect_checkpoint(out / "checkpoints" / "step-3", checksums=False)
    assert quick.state == "damaged" and "rng_state_0.pt has 1 bytes" in quick.problem

    console = Console(file=io.StringIO(), width=300)
    trainer = Trainer(_cfg(out, stories_dir, hh_path, resume="auto"), progress=False, console=console).setup()
    assert trainer.resume_from.name == "step-2"
    said = console.file.getvalue()
    assert f"step-4 is damaged: {rel}: sha256 differs" in said and "step-3 is damaged" in said
    trainer.train()  # steps 3 and 4 again: the run ends as the undamaged one did
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(out)]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]
    assert ckpt.inspect_checkpoint(out / "checkpoints" / "step-4").complete


def test_an_unfinished_save_is_incomplete_and_an_explicit_resume_from_it_is_refused(run, tmp_path, stories_dir,
                                                                                     hh_path):
    out = _copy(run, tmp_path)
    (out / "checkpoints" / "step-4" / "manifest.json").unlink()  # killed before the commit point
    status = ckpt.inspect_checkpoint(out / "checkpoints" / "step-4")
    assert status.state == "incomplete" and "no manifest.json" in status.problem
    assert [p.name for p in list_checkpoints(out)] == ["step-1", "step-2", "step-3"]
    with pytest.raises(ResumeError, match=r"step-4 is not a complete checkpoint \(incomplete: no manifest"):
        Trainer(_cfg(out, stories_dir, hh_path, resume=str(out / "checkpoints" / "step-4")), progress=False).setup()
    _damage(out / "checkpoints" / "step-3" / "trainer_state.json", 0.0)
    with pytest.raises(ResumeError, match=r"step-3 is not a complete checkpoint \(damaged: trainer_state.json"):
        Trainer(_cfg(out, stories_dir, hh_path, resume=str(out / "checkpoints" / "step-3")), progress=False).setup()


def test_orpo_checkpoints_lists_each_state(run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    assert main(["checkpoints", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [[f"step-{i}", "complete"] for i in range(1, 5)]
    assert "written by 1 process (single)" in lines[0]
    _damage(out / "checkpoints" / "step-2" / "state" / "__0_0.distcp")
    (out / "checkpoints" / "step-4" / "manifest.json").unlink()
    assert main(["checkpoints", str(out)]) == 1  # the newest is not complete
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["complete", "damaged", "complete", "incomplete"]
    assert "state/__0_0.distcp: sha256 differs" in lines[1] and "no manifest.json" in lines[3]
    assert main(["checkpoints", str(tmp_path / "nothing")]) == 0
    assert "no checkpoints" in capsys.readouterr().out


def test_deleting_a_checkpoint_removes_its_manifest_first(run, tmp_path):
    out = _copy(run, tmp_path)
    ckpt.rotate_checkpoints(out, keep=2)
    assert [p.name for p in ckpt.step_folders(out)] == ["step-3", "step-4"]
    (out / "checkpoints" / "step-3" / "manifest.json").unlink()  # as if killed while deleting it
    removed = ckpt.rotate_checkpoints(out, keep=2)
    assert [p.name for p in removed] == ["step-3"] and [p.name for p in ckpt.step_folders(out)] == ["step-4"]


# ---------------------------------------------------------------------------------------------
# Which process-count changes a resume accepts (no training: a hand-written checkpoint)


def _fake_checkpoint(folder, cfg, num_processes, batch_size, engine="fsdp2"):
    folder.mkdir(parents=True)
    saved = cfg.model_dump(mode="json")
    saved["train"]["batch_size"] = batch_size
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    state = ckpt.TrainState(step=2, data_fingerprint="fp", num_processes=num_processes, engine=engine)
    (folder / "trainer_state.json").write_text(state.to_json())
    return folder


def _per_epoch(rows):
    """Micro-batches per epoch as the trainer counts them (last short one dropped below `n` rows)."""
    from orpo.train.trainer import epoch_micro_batches

    return lambda bs, n: len(epoch_micro_batches(rows, bs, 0, 0, 0, n))


@pytest.mark.parametrize(("saved", "now", "ok"), [
    ((2, 2), (1, 4), True),  # 2 processes x 2 -> 1 x 4: the same global micro-batch
    ((1, 4), (2, 2), True),
    ((2, 2), (4, 1), True),
    ((2, 2), (1, 2), False),  # global micro-batch 4 -> 2: another run
    ((2, 2), (3, 1), False),
])
def test_resume_accepts_another_process_count_with_the_same_global_batch(tmp_path, stories_dir, hh_path, saved,
                                                                         now, ok):
    (old_n, old_bs), (n, bs) = saved, now
    cfg = _cfg(tmp_path / "out", stories_dir, hh_path, batch_size=bs)
    folder = _fake_checkpoint(tmp_path / "step-2", cfg, old_n, old_bs)
    if ok:
        state = resume.check_resume_compatible(folder, cfg, "fp", n, "fsdp2", _per_epoch(16))
        assert state.step == 2
    else:
        with pytest.raises(ResumeError, match="global micro-batch"):
            resume.check_resume_compatible(folder, cfg, "fp", n, "fsdp2", _per_epoch(16))


def test_resume_refuses_what_changes_the_data_order_or_the_zero_files(tmp_path, stories_dir, hh_path):
    bs1, bs2, bs4 = (_cfg(tmp_path / "out", stories_dir, hh_path, batch_size=b) for b in (1, 2, 4))
    with pytest.raises(ResumeError, match="set train.batch_size=2 to keep it"):
        resume.check_resume_compatible(_fake_checkpoint(tmp_path / "a", bs1, 1, 2), bs1, "fp", 1, "fsdp2", _per_epoch(9))
    # 9 rows in global micro-batches of 4: the last (1 row) is kept by 1 process, dropped by 2
    with pytest.raises(ResumeError, match="last, short micro-batch"):
        resume.check_resume_compatible(_fake_checkpoint(tmp_path / "b", bs2, 1, 4), bs2, "fp", 2, "fsdp2", _per_epoch(9))
    budget = _cfg(tmp_path / "out", stories_dir, hh_path, batch_size=4, max_tokens_per_batch=100)
    with pytest.raises(ResumeError, match="with train.max_tokens_per_batch the global batch is a number of"):
        resume.check_resume_compatible(_fake_checkpoint(tmp_path / "d", budget, 2, 2), budget, "fp", 1, "fsdp2",
                                     _per_epoch(16))
    with pytest.raises(ResumeError, match="ZeRO checkpoints resume with the same engine and process count"):
        resume.check_resume_compatible(_fake_checkpoint(tmp_path / "c", bs4, 2, 2, engine="zero3"), bs4, "fp", 1,
                                     "single", _per_epoch(16))


def test_resume_rewrites_metrics_atomically_and_drops_a_line_cut_by_a_kill(tmp_path):
    """A kill while a row was being appended leaves half a line: resuming drops it (and the rows after
    the checkpoint), and writes the file whole or not at all."""
    from orpo.train.logger import MetricsLogger

    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 3, "loss": 0.8}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    MetricsLogger(tmp_path, [], {}, resume_step=2).close()
    assert read_metrics(tmp_path) == rows[:2] and not list(tmp_path.glob(".*.tmp"))
    path.write_text('{"step": 1, "lo\n' + json.dumps(rows[1]) + "\n")  # a broken row before the last is not a kill's
    with pytest.raises(ValueError):
        MetricsLogger(tmp_path, [], {}, resume_step=2)
