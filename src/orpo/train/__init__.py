"""The training loop on Accelerate: ``train(cfg)``, ``evaluate(...)``, ``merge_lora(...)``."""

from orpo.disk import SaveFailed
from orpo.train.checkpoint import list_checkpoints
from orpo.train.divergence import TrainingDiverged
from orpo.train.evaluate import evaluate, load_for_inference
from orpo.train.logger import read_metrics
from orpo.train.merge import merge_lora
from orpo.train.model import ensure_pad_token, load_model, load_tokenizer
from orpo.train.objective import ORPOObjective
from orpo.train.resume import ResumeError
from orpo.train.trainer import Trainer, TrainingStopped, TrainResult, train
from orpo.train.watch import Watcher

__all__ = [
    "ORPOObjective", "ResumeError", "SaveFailed", "TrainResult", "Trainer", "TrainingDiverged", "TrainingStopped", "Watcher",
    "ensure_pad_token", "evaluate",
    "list_checkpoints", "load_for_inference", "load_model", "load_tokenizer", "merge_lora", "read_metrics", "train",
]
