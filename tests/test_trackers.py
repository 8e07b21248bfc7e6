"""`train.report_to` trackers, read back through each tracker's own client: MLflow (a SQLite store in
the test's folder), Trackio (its local SQLite under TRACKIO_DIR); run name, project and tags included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny import TINY

from orpo.config import ConfigError, load_config
from orpo.train import Trainer, read_metrics
from orpo.train.samples import read_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(out, stories_dir, hh_path, **train):
    return {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12, "eval_fraction": 0.25},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1,
                  "eval_every": 2, "eval_generate": 2, "eval_generate_max_tokens": 3, "save_final": False,
                  "run_name": "my-run", "project": "team", "tags": ["orpo-test", "tiny"], **train},
    }


def test_mlflow_gets_metrics_params_tags_and_samples(tmp_path, stories_dir, hh_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns, as MLflow does
    out = tmp_path / "run"
    Trainer(load_config(raw=_raw(out, stories_dir, hh_path, report_to=["mlflow"])), progress=False).setup().train()

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("team")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    assert {"orpo-test", "tiny"} <= set(run.data.tags)
    assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["orpo.beta"] == "0.1"
    rows = read_metrics(out)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [0, 2, 4]
    tables = sorted(f.path for f in client.list_artifacts(run.info.run_id, "samples"))
    assert tables == ["samples/step_0000000.json", "samples/step_0000002.json", "samples/step_0000004.json"]
    local = client.download_artifacts(run.info.run_id, tables[-1], str(tmp_path))
    table = json.loads(open(local).read())
    completions = [r[table["columns"].index("completion")] for r in table["data"]]
    assert completions == [s["completion"] for s in read_samples(out) if s["step"] == 4]
    assert not (out / "mlflow").exists()  # the user's store, not the run folder


def test_mlflow_without_a_uri_keeps_its_store_in_the_run_folder(tmp_path, stories_dir, hh_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    Trainer(load_config(raw=_raw(out, stories_dir, hh_path, report_to=["mlflow"], max_steps=2, eval_every=None,
                                 eval_generate=0)), progress=False).setup().train()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert "mlflow" in json.loads((out / ".orpo.json").read_text())["made"]  # orpo's: overwrite may remove it


def test_trackio_gets_metrics_and_samples(tmp_path, stories_dir, hh_path):
    """In child processes: trackio reads TRACKIO_DIR once, at import."""
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(_raw(out, stories_dir, hh_path, report_to=["trackio"])))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "orpo.cli", "train", str(cfg)], env=env, check=True, capture_output=True)
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps({'runs': S.get_runs('team'), 'logs': S.get_logs('team', 'my-run')}))")
    got = json.loads(subprocess.run([sys.executable, "-c", read], env=env, check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    assert got["runs"] == ["my-run"]
    losses = [(r["step"], r["loss"]) for r in got["logs"] if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]
    tables = [r for r in got["logs"] if "samples" in r]
    assert [t["step"] for t in tables] == [0, 2, 4]
    assert [row["completion"] for row in tables[-1]["samples"]["_value"]] == [
        s["completion"] for s in read_samples(out) if s["step"] == 4]


def test_wandb_gets_the_eval_samples_as_a_table(tmp_path, stories_dir, hh_path):
    """Offline W&B (no account, no network): the tables W&B itself serialized into the run's files."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(_raw(out, stories_dir, hh_path, report_to=["wandb"])))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    subprocess.run([sys.executable, "-m", "orpo.cli", "train", str(cfg)], env=env, check=True, capture_output=True)
    [run_dir] = (out / "wandb").glob("offline-run-*")
    tables = {int(p.name.split("_")[1]): json.loads(p.read_text()) for p in (run_dir / "files" / "media" / "table")
              .glob("samples_*.table.json")}
    assert sorted(tables) == [0, 2, 4]
    samples = read_samples(out)
    for step, table in tables.items():
        assert table["columns"] == ["step", "prompt", "completion", "chosen", "rejected"]
        assert table["data"] == [[step, s["prompt"], s["completion"], s["chosen"], s["rejected"]]
                                 for s in samples if s["step"] == step]
    assert "wandb" in json.loads((out / ".orpo.json").read_text())["made"]


def test_a_missing_tracker_names_the_extra_before_any_work(tmp_path, stories_dir, hh_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow is not installed: pip install 'orpo\[mlflow\]'"):
        Trainer(load_config(raw=_raw(tmp_path / "run", stories_dir, hh_path, report_to=["mlflow"])),
                progress=False).setup()
    assert not (tmp_path / "run").exists()
