"""Generations during eval (``train.eval_generate``): what the model now says to a few eval prompts.

Numbers say whether the model prefers chosen to rejected; a greedy completion next to both shows
what it learned to write. At each eval the main process completes the first N eval prompts with
the unwrapped model (no DDP wrapper: generation has no backward and runs on one rank only; a
sharded model, FSDP2 or ZeRO-3, needs every rank in each forward, so there all ranks generate
the same tokens and the main process writes them) and appends one row per prompt to ``OUTPUT_DIR/samples.jsonl``: ``step, prompt, completion, chosen,
rejected``; with TensorBoard in ``train.report_to`` the same rows appear as text under ``samples``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orpo import disk
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer

SAMPLES_FILE = "samples.jsonl"


@torch.no_grad()
def greedy_completions(model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int | None,
                       device: torch.device | str, eos_token_id: int | None = None,
                       lockstep: bool = False) -> list[list[int]]:
    """The new token ids of a greedy completion of each prompt (one at a time: no padding to get wrong).

    ``lockstep``: for a sharded model (FSDP2, ZeRO-3), whose every forward gathers weights on all
    ranks: every rank must call this with the same prompts; each prompt then takes exactly
    ``max_new_tokens`` forwards (no early stop at EOS, which one rank could reach alone), and the
    completion is cut after its first ``eos_token_id``.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for ids in prompts:
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            if lockstep:
                new = _fixed_length_greedy(model, input_ids, max_new_tokens)
                if eos_token_id is not None and eos_token_id in new:
                    new = new[: new.index(eos_token_id) + 1]
            else:
                generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                           pad_token_id=pad_token_id)
                new = generated[0, input_ids.shape[1]:].tolist()
            out.append(new)
    finally:
        model.train(was_training)
    return out


def _fixed_length_greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Exactly ``max_new_tokens`` greedy tokens with the KV cache: the same forwards on every rank."""
    result = model(input_ids=input_ids, use_cache=True)
    new: list[int] = []
    for i in range(max_new_tokens):
        token = result.logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(token))
        if i + 1 < max_new_tokens:
            result = model(input_ids=token, past_key_values=result.past_key_values, use_cache=True)
    return new


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
        new = greedy_completions(model, prompts, self.max_new_tokens, tok.pad_token_id, trainer.accelerator.device,
                                 eos_token_id=tok.eos_token_id, lockstep=sharded)
        if not trainer.is_main:
            return

        def text(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        samples = [{"step": row["step"], "prompt": text(p), "completion": text(n), "chosen": text(c),
                    "rejected": text(r)} for p, n, c, r in zip(prompts, new, chosen, rejected, strict=True)]
        disk.append_text(trainer.output_dir / SAMPLES_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                                    for s in samples))
        if trainer.logger is not None:
            trainer.logger.log_text("samples", samples_markdown(samples), row["step"])


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """Samples as Markdown for TensorBoard's text tab (fenced blocks keep the dialogue's line breaks)."""
    fence = "```"
    parts = []
    for i, s in enumerate(samples):
        fields = "\n\n".join(f"**{k}**\n\n{fence}\n{s[k].replace(fence, '~~~')}\n{fence}"
                             for k in ("prompt", "completion", "chosen", "rejected"))
        parts.append(f"### sample {i}\n\n{fields}")
    return "\n\n".join(parts)


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``samples.jsonl`` (a run folder or the file), in order."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]
