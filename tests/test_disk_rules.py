"""What orpo will never do to your disk: each case a careful user tried with decoy folders and crafted
files (issue 17), run through the real CLI; the decoys are compared byte for byte afterwards."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orpo import disk
from orpo.cli import main
from orpo.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, out: Path | str, **train) -> Path:
    cfg = {
        "model": {"init": {"arch": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64},
                  "tokenizer": str(QS / "tokenizer")},
        "data": {"train": str(QS / "train.jsonl"), "eval": str(QS / "eval.jsonl"), "max_length": 48,
                 "max_samples": 16},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 8, "eval_batch_size": 16,
                  "log_every": 1, **train},
    }
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links as their target, not followed), to compare byte for byte."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


def _decoys(folder: Path) -> dict[str, bytes | str]:
    """A folder a user keeps: a model, notes with comments, docs."""
    (folder / "llama-7b").mkdir(parents=True)
    (folder / "llama-7b" / "config.json").write_text('{"model_type": "llama"}')
    (folder / "notes.txt").write_text("# my notes\nlr 1e-5 was better\n")
    (folder / "config.yaml").write_text("# the user's own config, with comments\ntrain:\n  max_steps: 9\n")
    return _snapshot(folder)


def _one_line_exit_2(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1] and "Traceback" not in err, err
    err = errors[0]
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with two checkpoints and a final model."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(["train", str(_config(tmp, tmp / "run", save_every=1, max_steps=2))]) == 0
    return tmp / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, symlinks=True)
    return out


# -- ownership -------------------------------------------------------------------------------


def test_a_folder_orpo_did_not_make_is_refused_however_overwrite_is_set(tmp_path, capsys):
    user = tmp_path / "mine"
    before = _decoys(user)
    for overwrite in ("false", "true"):
        _one_line_exit_2(capsys, ["train", str(_config(tmp_path, user)), f"train.overwrite={overwrite}"],
                         "is not empty and orpo did not make it", "llama-7b")
    assert _snapshot(user) == before


def test_output_dir_dot_in_a_folder_of_the_users_is_refused(tmp_path, capsys, monkeypatch):
    before = _decoys(tmp_path / "project")
    cfg = _config(tmp_path, ".")
    monkeypatch.chdir(tmp_path / "project")
    _one_line_exit_2(capsys, ["train", str(cfg)], "orpo did not make it")
    assert _snapshot(tmp_path / "project") == before


@pytest.mark.parametrize("where", ["/", "home"])
def test_root_and_home_are_always_refused(tmp_path, capsys, monkeypatch, where):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = "/" if where == "/" else "~"
    for overwrite in ("false", "true"):
        _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out)), f"train.overwrite={overwrite}"],
                         "root folder" if where == "/" else "home folder")
    assert list(home.iterdir()) == []


def test_output_dir_naming_a_file_is_refused_before_anything_loads(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    # a tokenizer that does not exist: the folder is checked first, before anything is loaded
    _one_line_exit_2(capsys, ["train", str(_config(tmp_path, notes)), f"model.tokenizer={tmp_path / 'no-tok'}"],
                     "is a file, not a folder")
    assert notes.read_text() == "mine"


def test_overwrite_removes_only_what_the_previous_run_made(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "my-notes.md").write_text("keep me")
    (out / "mine").mkdir()
    (out / "mine" / "data.bin").write_bytes(b"\x00\x01")
    old_final = (out / "final" / "model.safetensors").read_bytes()
    assert main(["train", str(_config(tmp_path, out, save_every=None)), "train.overwrite=true", "train.seed=7"]) == 0
    assert (out / "my-notes.md").read_text() == "keep me" and (out / "mine" / "data.bin").read_bytes() == b"\x00\x01"
    assert not (out / "checkpoints").exists()
    assert (out / "final" / "model.safetensors").read_bytes() != old_final


def test_a_run_from_before_the_marker_is_adopted_by_its_files(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / disk.MARKER).unlink()
    _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out))], "already holds a run")
    assert main(["train", str(_config(tmp_path, out)), "train.overwrite=true"]) == 0
    assert disk.read_marker(out)["kind"] == "run"


def test_resume_auto_on_a_finished_run_stops_and_overwrite_trains_it_again(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out, resume="auto"))], "holds a finished run")
    assert _snapshot(out) == before
    assert main(["train", str(_config(tmp_path, out, resume="auto", overwrite=True))]) == 0
    assert disk.read_marker(out)["finished_step"] == 2


def test_a_bad_input_found_late_stops_before_the_previous_run_is_touched(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out)), "train.overwrite=true",
                              f"data.general_eval={tmp_path / 'no-such-file.txt'}"], "no-such-file.txt")
    assert _snapshot(out) == before


def test_tilde_and_variables_are_expanded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(_config(tmp_path, "~/run", save_final=False))]) == 0
    assert (home / "run" / "metrics.jsonl").is_file() and not (tmp_path / "~").exists()
    assert main(["train", str(_config(tmp_path, "$RUNS/a", save_final=False))]) == 0
    assert (tmp_path / "runs" / "a" / "metrics.jsonl").is_file()


# -- symlinks --------------------------------------------------------------------------------


def test_rotation_never_follows_a_symlinked_checkpoint(finished, tmp_path):
    out = _copy(finished, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text('{"keep": true}')
    (outside / "precious.txt").write_text("precious")
    (out / "checkpoints" / "step-0").symlink_to(outside, target_is_directory=True)
    before = _snapshot(outside)
    ckpt.rotate_checkpoints(out, keep=1)
    assert _snapshot(outside) == before
    assert (out / "checkpoints" / "step-0").is_symlink()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2"]


@pytest.mark.parametrize("name", ["config.yaml", "final", "metrics.jsonl"])
def test_nothing_is_written_through_a_symlink_in_the_run_folder(finished, tmp_path, capsys, name):
    """Going on with the run: the link is refused. Starting over: the link itself goes, never its target."""
    out = _copy(finished, tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "file").write_text("theirs")
    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    (out / name).symlink_to(target if name == "final" else target / "file")
    before = _snapshot(target)
    _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out, resume="auto", max_steps=3))], "symlink", name)
    assert _snapshot(target) == before and (out / name).is_symlink()
    assert main(["train", str(_config(tmp_path, out, save_every=None)), "train.overwrite=true"]) == 0
    assert _snapshot(target) == before and not (out / name).is_symlink() and (out / name).exists()


# -- merge, sweep ----------------------------------------------------------------------------


def test_merge_never_empties_an_existing_folder(finished, tmp_path, capsys, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    user = tmp_path / "models"
    before = _decoys(user)
    _one_line_exit_2(capsys, ["merge", str(adapter), str(user)], "orpo did not make it")
    assert _snapshot(user) == before
    run = _copy(finished, tmp_path)
    run_before = _snapshot(run)
    _one_line_exit_2(capsys, ["merge", str(run / "final"), str(run)], str(run))
    assert _snapshot(run) == run_before
    monkeypatch.chdir(user)
    _one_line_exit_2(capsys, ["merge", str(adapter), "."], "orpo did not make it")
    assert _snapshot(user) == before and not (tmp_path / "..tmp").exists()
    _one_line_exit_2(capsys, ["merge", str(adapter), "notes.txt"], "is a file")
    assert _snapshot(user) == before


def test_a_sweep_never_replaces_a_folder_it_did_not_make(tmp_path, capsys):
    root = tmp_path / "sweeps"
    (root / "sweep").mkdir(parents=True)
    (root / "sweep" / "mine.md").write_text("my table")
    before = _snapshot(root)
    _one_line_exit_2(capsys, ["sweep", str(_config(tmp_path, root)), "train.seed=1,2"], "orpo did not make it")
    assert _snapshot(root) == before


# -- one run per folder ----------------------------------------------------------------------


HOLD = """
import sys, time
from pathlib import Path
from orpo import disk
lock = disk.FolderLock(Path(sys.argv[1]), "test")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        err = _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out)), "train.overwrite=true"],
                               "in use by another orpo run", f"PID {holder.pid}")
        assert "space" not in err
        assert {k: v for k, v in _snapshot(out).items() if k != disk.LOCK} == {
            k: v for k, v in before.items() if k != disk.LOCK}
    finally:
        holder.kill()
        holder.wait()
    # killed, the holder leaves no stale lock: the kernel released it
    time.sleep(0.1)
    assert main(["train", str(_config(tmp_path, out, save_every=None)), "train.overwrite=true"]) == 0


# -- no code from checkpoint files -----------------------------------------------------------


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def _rewrite_manifest(folder: Path) -> None:
    """Re-sign a checkpoint after tampering, as a crafter would: sizes and hashes that match."""
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"] = ckpt.checksum_files(folder)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_crafted_dcp_index_is_damage_and_its_code_never_runs(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    pwned = tmp_path / "pwned"
    newest = out / "checkpoints" / "step-2"
    (newest / "state" / ".metadata").write_bytes(pickle.dumps(_Payload(str(pwned))))
    _rewrite_manifest(newest)
    status = ckpt.inspect_checkpoint(newest)
    assert status.state == "damaged" and "refusing" in status.problem and not pwned.exists()
    capsys.readouterr()
    assert main(["checkpoints", str(out)]) == 1
    assert "step-2       damaged" in capsys.readouterr().out and not pwned.exists()
    with pytest.raises(pickle.UnpicklingError, match="refusing pathlib.Path.write_text"):
        ckpt.read_weights(newest)
    assert not pwned.exists()
    shutil.rmtree(out / "final")
    ckpt_dir_before = _snapshot(out / "checkpoints" / "step-1")
    assert main(["train", str(_config(tmp_path, out, resume="auto", save_every=1))]) == 0
    assert not pwned.exists() and "step-2 is damaged" in capsys.readouterr().err
    assert _snapshot(out / "checkpoints" / "step-1") == ckpt_dir_before


@pytest.mark.parametrize("files", [
    {},
    {"../../outside.txt": {"size": 3, "sha256": "0" * 64}},
    {"/etc/hostname": {"size": 3, "sha256": "0" * 64}},
    {"trainer_state.json": {"size": "big", "sha256": "0" * 64}},
    {"trainer_state.json": ["not", "a", "record"]},
])
def test_a_malformed_manifest_is_damage_and_resume_falls_back(finished, tmp_path, capsys, files):
    out = _copy(finished, tmp_path)
    newest = out / "checkpoints" / "step-2"
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    manifest["files"] = files if files else {}
    if files and "trainer_state.json" not in files:
        manifest["files"].update({k: v for k, v in json.loads((newest / ckpt.MANIFEST).read_text())["files"].items()})
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    status = ckpt.inspect_checkpoint(newest)
    assert status.state == "damaged", status
    assert "/etc" not in status.describe() or "not a path inside" in status.problem
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(["train", str(_config(tmp_path, out, resume="auto", save_every=None))]) == 0
    assert "step-2 is damaged" in capsys.readouterr().err


def test_an_unknown_key_in_trainer_state_is_damage_and_an_explicit_resume_is_one_line(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    newest = out / "checkpoints" / "step-2"
    state = json.loads((newest / ckpt.STATE_FILE).read_text())
    (newest / ckpt.STATE_FILE).write_text(json.dumps({**state, "from_the_future": 1}))
    _rewrite_manifest(newest)
    status = ckpt.inspect_checkpoint(newest)
    assert status.state == "damaged" and "unknown key 'from_the_future'" in status.problem
    shutil.rmtree(out / "final")
    _one_line_exit_2(capsys, ["train", str(_config(tmp_path, out, resume=str(newest)))], "from_the_future")


# -- report ----------------------------------------------------------------------------------


def test_a_report_goes_only_into_a_folder_of_its_own(finished, tmp_path, capsys):
    user = tmp_path / "docs"
    before = _decoys(user)
    _one_line_exit_2(capsys, ["report", str(finished), "--out", str(user)], "orpo did not make it")
    assert _snapshot(user) == before
    _one_line_exit_2(capsys, ["report", str(finished), "--out", str(finished)], "one of the runs")
    out = tmp_path / "report"
    assert main(["report", str(finished), "--out", str(out)]) == 0
    first = (out / "report.html").read_bytes()
    assert main(["report", str(finished), "--out", str(out)]) == 0
    assert (out / "report.html").is_file() and disk.read_marker(out)["kind"] == "report" and first
    (out / "mine.txt").write_text("mine")
    _one_line_exit_2(capsys, ["report", str(finished), "--out", str(out)], "mine.txt")
    assert (out / "mine.txt").read_text() == "mine"


def test_merge_replaces_only_a_merged_model_it_wrote(tmp_path, capsys):
    assert main(["train", str(_config(tmp_path, tmp_path / "run")), "model.lora.r=4", "data.eval=null"]) == 0
    final, merged = tmp_path / "run" / "final", tmp_path / "merged"
    assert main(["merge", str(final), str(merged)]) == 0
    assert disk.read_marker(merged)["kind"] == "model" and (merged / "model.safetensors").is_file()
    assert main(["merge", str(final), str(merged)]) == 0
    (merged / "notes.txt").write_text("mine")
    _one_line_exit_2(capsys, ["merge", str(final), str(merged)], "notes.txt", "orpo did not make")
    assert (merged / "notes.txt").read_text() == "mine" and (merged / "model.safetensors").is_file()


def test_tilde_in_an_explicit_resume_path_is_expanded(finished, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = home / "run"
    shutil.copytree(finished, out, symlinks=True)
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(["train", str(_config(tmp_path, out, resume="~/run/checkpoints/step-1"))]) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-1'} (step 1)" in capsys.readouterr().err


def test_scratch_folders_of_dead_processes_go_and_nothing_else(tmp_path, stories_tokenizer, hh_path):
    """A kill mid-preprocess left ``.work-*`` folders (the pairs and tokens of the whole dataset) forever."""
    from orpo import disk
    from orpo.config import DataConfig
    from orpo.data.pipeline import prepare_data

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / disk.scratch_name("work", "ab12").replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    (dead / "sub").mkdir(parents=True)
    live = cache / disk.scratch_name("work", "cd34")
    live.mkdir()
    other_host = cache / dead.name.replace(dead.name.split("-")[2], "0" * 8)
    other_host.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    link = cache / dead.name.replace("-ab12-", "-ef56-")
    link.symlink_to(outside)
    foreign = cache / ".work-mine"
    foreign.mkdir()
    cfg = DataConfig(train=str(hh_path), max_length=64, max_samples=8, cache_dir=str(cache))
    prepare_data(cfg, stories_tokenizer, chat_template="none")
    assert not dead.exists()
    assert live.is_dir() and other_host.is_dir() and foreign.is_dir() and link.is_symlink()
    assert (outside / "keep.txt").read_text() == "x"
