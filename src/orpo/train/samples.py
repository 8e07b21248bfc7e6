"""Generations during eval (``train.eval_generate``): what the model now says to a few eval prompts.

Numbers say whether the model prefers chosen to rejected; a greedy completion next to both shows
what it learned to write. At each eval the main process completes the first N eval prompts (batched, greedy:
``orpo.generation``) with the unwrapped model (no DDP wrapper: generation has no backward and runs on one rank only; a
sharded model, FSDP2 or ZeRO-3, needs every rank in each forward, so there all ranks generate
the same tokens and the main process writes them) and appends one row per prompt to ``OUTPUT_DIR/samples.jsonl``: ``step, prompt, completion, chosen,
rejected``; every tracker in ``train.report_to`` gets the same rows (TensorBoard as text under ``samples``, W&B, MLflow and Trackio as a table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo import disk
from orpo.generation import generate
from orpo.train.logger import read_rows
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer

SAMPLES_FILE = "samples.jsonl"


class EvalSamples(Watcher):
    """Greedy completions of the first ``num`` eval prompts at every eval, written by the main process."""

    def __init__(self, num: int, max_new_tokens: int = 64):
        self.num, self.max_new_tokens = num, max_new_tokens

    def on_start(self, trainer: Trainer) -> None:
        """Start the file afresh, or on resume keep the rows up to the resumed step (as metrics.jsonl)."""
        if not trainer.is_main:
            return
        path = disk.child(trainer.output_dir, SAMPLES_FILE, "train.output_dir")
        resumed = trainer.resume_from is not None
        kept = [r for r in read_samples(path) if r["step"] <= trainer.state.step] if resumed and path.exists() else []
        disk.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        # A sharded model (FSDP2, ZeRO-3) needs every rank in every forward: all generate, rank 0 writes.
        sharded = trainer.engine.sharded
        if trainer.eval_data is None or not (trainer.is_main or sharded):
            return
        data = trainer.eval_data[: self.num]
        tok = trainer.tokenizer
        prompts, chosen, rejected = [], [], []
        for c_ids, c_len, r_ids, r_len in zip(data["chosen_input_ids"], data["chosen_prompt_len"],
                                              data["rejected_input_ids"], data["rejected_prompt_len"], strict=True):
            prompts.append(list(c_ids[:c_len]))
            chosen.append(list(c_ids[c_len:]))
            rejected.append(list(r_ids[r_len:]))
        model = trainer.accelerator.unwrap_model(trainer.model)
        new = generate(model, prompts, self.max_new_tokens, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, device=trainer.accelerator.device, lockstep=sharded)
        if not trainer.is_main:
            return

        def text(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        samples = [{"step": row["step"], "prompt": text(p), "completion": text(n), "chosen": text(c),
                    "rejected": text(r)} for p, n, c, r in zip(prompts, new, chosen, rejected, strict=True)]
        disk.append_text(trainer.output_dir / SAMPLES_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                                    for s in samples))
        if trainer.logger is not None:
            trainer.logger.log_samples(samples, row["step"])


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``samples.jsonl`` (a run folder or the file), in order."""
    return read_rows(path, SAMPLES_FILE)
