"""The team's experiment trackers (``train.report_to``): TensorBoard, W&B, MLflow, Trackio, one small class each.

``metrics.jsonl`` is always written (``logger.MetricsLogger``); a tracker mirrors its numbers and the
eval samples. A tracker is three methods, so a new one is one class here and one line in
``TRACKERS``. Each is imported only when asked for, and a missing package is one line naming the
extra to install, before any work (``check_installed``). Every tracker gets the same run name
(``train.run_name``, default the output folder's name), project (``train.project``) and tags.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orpo.config import ConfigError

SAMPLE_COLUMNS = ("prompt", "completion", "chosen", "rejected")


@dataclass(frozen=True)
class RunInfo:
    """What every tracker is started with."""

    output_dir: Path
    config: dict[str, Any]
    run_name: str
    project: str
    tags: tuple[str, ...] = ()
    resume_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars under ``train/`` and ``eval/``, the samples as Markdown text (``OUTPUT_DIR/tensorboard``)."""

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.output_dir / "tensorboard"), purge_step=run.resume_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            tag = f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k}"
            self.writer.add_scalar(tag, v, step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text("samples", samples_markdown(samples), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``train.project`` with the run name and tags; the samples as a ``wandb.Table``."""

    def __init__(self, run: RunInfo):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=run.project, name=run.run_name, tags=list(run.tags), config=run.config,
                              dir=str(run.output_dir), resume="allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        table = self.wandb.Table(columns=["step", *SAMPLE_COLUMNS],
                                 data=[[step, *(s[c] for c in SAMPLE_COLUMNS)] for s in samples])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run through its client (no global active run to clash with the user's own).

    The tracking store is ``MLFLOW_TRACKING_URI`` when set (a server, a database), else a SQLite
    store in ``OUTPUT_DIR/mlflow`` (``mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow/mlflow.db``).
    The config goes in as flattened params; the samples as a table artifact per eval.
    """

    def __init__(self, run: RunInfo):
        from mlflow.tracking import MlflowClient

        local = run.output_dir / "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local / 'mlflow.db'}"
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            local.mkdir(exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(run.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            run.project, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else
            (local / "artifacts").as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=run.run_name,
                                             tags={**{t: "" for t in run.tags}, "orpo.output_dir": str(run.output_dir)}
                                             ).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(run.config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        self.client.log_table(self.run_id, {c: [s[c] for s in samples] for c in SAMPLE_COLUMNS},
                              artifact_file=f"samples/step_{step:07d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """A Trackio run (local SQLite under ``TRACKIO_DIR``, or a Space); the samples as a ``trackio.Table``."""

    def __init__(self, run: RunInfo):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=run.project, name=run.run_name, config=run.config, resume="allow",
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        table = self.trackio.Table(columns=["step", *SAMPLE_COLUMNS],
                                   data=[[step, *(s[c] for c in SAMPLE_COLUMNS)] for s in samples])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


@dataclass(frozen=True)
class TrackerSpec:
    module: str
    extra: str
    make: type
    folder: str | None = None


# name in train.report_to -> (package to import, pip extra, class, folder it writes in OUTPUT_DIR)
TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", TensorBoardTracker, "tensorboard"),
    "wandb": TrackerSpec("wandb", "wandb", WandbTracker, "wandb"),
    "mlflow": TrackerSpec("mlflow", "mlflow", MLflowTracker, "mlflow"),
    "trackio": TrackerSpec("trackio", "trackio", TrackioTracker),
}


def check_installed(report_to: Sequence[str]) -> None:
    """Fail before any work when a requested tracker's package is missing."""
    for name in report_to:
        spec = TRACKERS[name]
        if importlib.util.find_spec(spec.module) is None:
            raise ConfigError(f"train.report_to includes {name} but {spec.module} is not installed: "
                              f"pip install 'orpo[{spec.extra}]' (or remove it from train.report_to)")


def folders(report_to: Sequence[str]) -> list[str]:
    """The folders the requested trackers write inside the run folder (listed in its marker)."""
    local = {"mlflow": not os.environ.get("MLFLOW_TRACKING_URI")}
    return [s.folder for n, s in TRACKERS.items() if n in report_to and s.folder and local.get(n, True)]


def start(report_to: Sequence[str], run: RunInfo) -> list[Tracker]:
    check_installed(report_to)
    return [TRACKERS[name].make(run) for name in report_to]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """Samples as Markdown for TensorBoard's text tab (fenced blocks keep the dialogue's line breaks)."""
    fence = "```"
    parts = []
    for i, s in enumerate(samples):
        fields = "\n\n".join(f"**{k}**\n\n{fence}\n{s[k].replace(fence, '~~~')}\n{fence}" for k in SAMPLE_COLUMNS)
        parts.append(f"### sample {i}\n\n{fields}")
    return "\n\n".join(parts)
