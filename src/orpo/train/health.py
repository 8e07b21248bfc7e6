"""What watches a run for ORPO's known failure modes, and keeps its best model: ``Watcher``s.

ORPO fails through its data and λ, not its code: λ too high (the chosen NLL rises while the
odds-ratio loss keeps falling), λ too low (rejected log-probs rise with the chosen ones, as in
plain SFT), no separation at all (noisy labels), an instruct model as the start, gradient spikes
and forgetting of general text. Each check here is one small watcher that calls
``trainer.warn(code, message)`` once when its condition first holds (printed, written to
metrics.jsonl, listed in the closing summary). Thresholds are ``train.health`` keys; why each
default is what it is: docs/health.md.

The curve checks (``lambda_too_high``, ``rejected_rising``, ``no_separation``) read the eval rows:
the same pairs at every eval, so a change is the model's and not the batch's; a run without eval
data is not judged by them. What a check remembers lives in ``trainer.state.watchers``, so a
resumed run judges exactly as the uninterrupted one. Every rank runs every watcher on the same
all-reduced numbers.

Also here: ``GeneralEval`` (``data.general_eval``: perplexity on plain text at each eval) and
``BestCheckpoint`` (``train.save_best``: ``OUTPUT_DIR/best/``).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

import torch

from orpo.config import Config, ConfigError, HealthConfig, metric_goal
from orpo.train.watch import Watcher

if TYPE_CHECKING:
    from orpo.train.trainer import Trainer, TrainResult


# ---------------------------------------------------------------------------------------------
# Curves over the eval rows


class EvalWindow:
    """The eval rows of the last ``window`` share of training (``health.window`` unless given; at least the
    last ``min_evals``), for some keys.

    Why eval rows and not the per-step train rows: the eval set is the same pairs at every eval, so
    a change between two evals is the model's own; a step's train metrics are of its batch, and on
    batches of a few pairs they vary more from batch to batch than the model moves over any window
    short enough to warn in time (on the HH runs a window of 16 logged steps had t < 2 for a rise
    the evals show plainly). Kept in ``state.watchers[name]``, so a resumed run sees the same window.
    """

    def __init__(self, name: str, keys: Sequence[str], health: HealthConfig, skip_first: bool = False,
                 window: float | None = None, min_evals: int = 2):
        self.name, self.keys, self.health, self.skip_first = name, tuple(keys), health, skip_first
        self.span, self.min_evals = health.window if window is None else window, min_evals

    def add(self, trainer: Trainer, row: dict[str, Any]) -> dict[str, float] | None:
        """Record an eval row; return each key's change across the window (last - first), or None."""
        values = [row.get(k) for k in self.keys]
        if (self.skip_first and row["step"] == 0) or any(v is None or not math.isfinite(v) for v in values):
            return None
        points: list[list[float]] = trainer.state.watchers.setdefault(self.name, [])
        points.append([row["step"], *(float(v) for v in values if v is not None)])
        since = row["step"] - self.span * trainer.total_steps
        points[:] = [p for i, p in enumerate(points) if p[0] >= since or i >= len(points) - self.min_evals]
        if len(points) < self.min_evals:
            return None
        self.first_step, self.last_step = int(points[0][0]), int(points[-1][0])
        self.first = dict(zip(self.keys, points[0][1:], strict=True))
        return {k: points[-1][i + 1] - points[0][i + 1] for i, k in enumerate(self.keys)}


def _lambda_name(trainer: Trainer) -> str:
    if trainer.objective.name == "orpo":
        return f"λ (orpo.beta = {trainer.cfg.orpo.beta:g})"
    return "the preference term's weight"


def _preference_terms(trainer: Trainer) -> list[str]:
    """The objective's loss terms other than the NLL (ORPO: or_loss); empty for plain SFT."""
    return [t.name for t in trainer.objective.terms if t.name != "nll_loss"]


# ---------------------------------------------------------------------------------------------
# The checks


class LambdaTooHigh(Watcher):
    """``lambda_too_high``: across the window, the eval NLL of the chosen responses rises by at least
    ``nll_rise`` of its value while the preference loss (ORPO: or_loss) falls by at least ``min_change``.

    The step-0 eval counts: a pretrained model losing fluency from its first steps is the case to
    catch (a fresh model's NLL only falls then). Needs an objective with an ``nll_loss`` term and a
    preference term of nonzero weight (ORPO, CPO-like); skipped otherwise.
    """

    code = "lambda_too_high"

    def __init__(self, health: HealthConfig):
        self.health = health
        self.window: EvalWindow | None = None

    def on_start(self, trainer: Trainer) -> None:
        terms = {t.name: t.weight for t in trainer.objective.terms}
        pref = [k for k in _preference_terms(trainer) if terms[k] != 0]
        if "nll_loss" in terms and pref:
            self.window = EvalWindow(self.code, ["eval_nll_loss", f"eval_{pref[0]}"], self.health)

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        w = self.window
        if w is None or self.code in trainer.state.warnings:
            return
        change = w.add(trainer, row)
        if change is None:
            return
        nll_key, pref_key = w.keys
        nll, pref = change[nll_key], change[pref_key]
        if nll >= self.health.nll_rise * abs(w.first[nll_key]) and pref <= -self.health.min_change:
            trainer.warn(self.code, (
                f"the chosen responses' eval NLL rose from {w.first[nll_key]:.3f} to {w.first[nll_key] + nll:.3f} "
                f"(+{nll / abs(w.first[nll_key]):.0%}) between steps {w.first_step} and {w.last_step} while "
                f"{pref_key.removeprefix('eval_')} fell by {-pref:.3f}: {_lambda_name(trainer)} may be too high "
                "(the preference term is bought with fluency on the chosen responses); try a lower λ or "
                "learning rate"))


class RejectedRising(Watcher):
    """``rejected_rising``: across its window (``rejected_window`` of training, at least ``rejected_evals``
    evals), the eval log-probs of the chosen responses rise by at least ``min_change`` and the rejected
    ones by at least ``rejected_rise`` of that: the SFT-like regime, λ too low. A short window is not
    enough: in a healthy run the rejected log-probs tick up between two evals and fall over the next.

    Judged from ``rejected_start`` of training on, and never on a window starting at step 0: at
    first every log-prob rises together (a pretrained model learns the template and the domain),
    whatever λ is. Not judged for a fresh ``model.init`` model, which raises every log-prob for as
    long as it is learning the language (in a short run, all of it), nor for an objective with no
    preference term (plain SFT).
    """

    code = "rejected_rising"

    def __init__(self, health: HealthConfig):
        self.health = health
        self.window: EvalWindow | None = None

    def on_start(self, trainer: Trainer) -> None:
        if _preference_terms(trainer) and trainer.cfg.model.init is None:
            self.window = EvalWindow(self.code, ["eval_logps_chosen", "eval_logps_rejected"], self.health,
                                     skip_first=True, window=self.health.rejected_window,
                                     min_evals=self.health.rejected_evals)

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        w, h = self.window, self.health
        if w is None or self.code in trainer.state.warnings:
            return
        change = w.add(trainer, row)
        if LambdaTooHigh.code in trainer.state.warnings:
            return  # a run just told its λ is too high is not told it is too low (a recovery looks alike)
        if change is None or row["step"] < h.rejected_start * trainer.total_steps:
            return
        chosen, rejected = change["eval_logps_chosen"], change["eval_logps_rejected"]
        if chosen >= h.min_change and rejected >= max(h.min_change, h.rejected_rise * chosen):
            trainer.warn(self.code, (
                f"the rejected responses' eval log-probs rose by {rejected:.3f} with the chosen ones' "
                f"({chosen:+.3f}) between steps {w.first_step} and {w.last_step}: the run behaves like plain SFT "
                f"on the chosen responses: {_lambda_name(trainer)} may be too low to push the rejected ones down (or "
                "the model cannot tell the pairs apart yet: see the eval accuracy)"))


class NoSeparation(Watcher):
    """``no_separation``: past ``separation_after`` of training, eval accuracy <= ``min_accuracy`` or
    the mean log odds ratio (``margin`` for objectives without one) <= 0.

    Judged only on eval sets of at least ``min_eval_pairs`` pairs: on fewer, an accuracy of 0.55 is
    within the noise of a coin.
    """

    code = "no_separation"

    def __init__(self, health: HealthConfig):
        self.health = health

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        h = self.health
        if (self.code in trainer.state.warnings or not _preference_terms(trainer) or row["step"] == 0
                or row["step"] < h.separation_after * trainer.total_steps
                or row.get("eval_pairs", 0) < h.min_eval_pairs):
            return
        sep_key = "eval_log_odds_ratio" if "eval_log_odds_ratio" in row else "eval_margin"
        acc, sep = row["eval_accuracy"], row.get(sep_key)
        if acc <= h.min_accuracy or (sep is not None and sep <= 0):
            trainer.warn(self.code, (
                f"at step {row['step']} of {trainer.total_steps} the model still barely prefers chosen over "
                f"rejected on the eval set (accuracy {acc:.3f}, {sep_key.removeprefix('eval_')} {sep:+.3f}): "
                "look for label noise or near-identical pairs (orpo audit), or train longer / with a higher "
                "learning rate"))


class GradSpikes(Watcher):
    """``grad_spikes``: a logged gradient norm above ``spike_factor`` x the median of the previous
    ``spike_window`` logged norms, ``max_spikes`` times. Pre-clipping norms: clipping hides a spike
    from the update, not from this check."""

    code = "grad_spikes"

    def __init__(self, health: HealthConfig):
        self.health = health

    def on_step(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        norm = row.get("grad_norm") if row else None
        if row is None or norm is None or not math.isfinite(norm) or self.code in trainer.state.warnings:
            return
        h = self.health
        mem = trainer.state.watchers.setdefault(self.code, {"norms": [], "spikes": []})
        norms: list[float] = mem["norms"]
        if len(norms) >= h.spike_window and norm > h.spike_factor * median(norms):
            mem["spikes"].append([row["step"], norm, median(norms)])
        norms.append(norm)
        del norms[: -h.spike_window]
        if len(mem["spikes"]) >= h.max_spikes:
            shown = "; ".join(f"step {s}: {n:.3g} ({n / m:.0f}x the median {m:.3g})" for s, n, m in mem["spikes"][:3])
            trainer.warn(self.code, (
                f"the gradient norm spiked ({shown}): the learning rate may be too high "
                "for this model, or some batches are unusual (very long or broken rows); keep train.max_grad_norm "
                "set, lower train.learning_rate or lengthen the warmup"))


# The name of a chat/instruct fine-tune (Qwen2.5-0.5B-Instruct, Llama-2-7b-chat-hf, gemma-2-2b-it,
# zephyr-7b-sft-full, ...): whole words, so "italian" or "chatterbox" do not count.
INSTRUCT_NAME = re.compile(r"(?:^|[-_./])(instruct|chat|it|sft|dpo|orpo|rlhf)(?:$|[-_./])", re.IGNORECASE)


def instruct_signs(name: str | None, tokenizer) -> list[str]:
    """Why a starting model looks like an instruct/chat model (empty: it does not).

    A name with instruct, chat, it, sft, ... as a word; or a chat template that writes the tokenizer's
    own EOS token (literally) to end turns. The second is what chat tuning does (Qwen2.5-*-Instruct: eos
    ``<|im_end|>``; Llama-3-*-Instruct: ``<|eot_id|>``) while the base models of the same families
    ship the same template with a document EOS (``<|endoftext|>``) that the template never writes,
    so a template alone is not a sign.
    """
    signs = []
    if name and INSTRUCT_NAME.search(Path(name.rstrip("/")).name):
        signs.append(f"its name '{name}'")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(template, str) and eos and eos in template:
        signs.append(f"its chat template ends turns with its EOS token {eos!r}")
    return signs


class InstructStart(Watcher):
    """``instruct_start``: the starting model looks like an instruct/chat model (``instruct_signs``).

    ORPO is meant to start from a base model: it does instruction tuning and preference alignment
    in one stage. Not checked for a fresh ``model.init`` model.
    """

    code = "instruct_start"

    def on_start(self, trainer: Trainer) -> None:
        if trainer.cfg.model.init is not None or trainer.state.step > 0:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        name = trainer.cfg.model.name_or_path or getattr(model.config, "_name_or_path", None)
        signs = instruct_signs(name, trainer.tokenizer)
        if signs:
            trainer.warn(self.code, (
                f"the starting model looks like an instruct/chat model ({' and '.join(signs)}): ORPO does "
                "instruction tuning and preference alignment in one stage and is meant to start from a base "
                "model; from a chat model the NLL term retrains what chat tuning already did and the gains are "
                "smaller. Use the base model, or silence this with train.health.ignore=[instruct_start]"))


# ---------------------------------------------------------------------------------------------
# Forgetting: perplexity on general text


def read_general_text(path: str | Path) -> list[str]:
    """The documents of a ``data.general_eval`` file: JSONL rows' ``text`` fields, or a whole plain-text file.

    ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, each a document; anything else is read as
    UTF-8 text, one document. Bad input raises ``DataError`` naming the file, line and field.
    """
    from orpo.data import DataError
    from orpo.data.sources import decode_text

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.general_eval: file not found: {p}")
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    text = decode_text(raw, str(p))
    if not p.name.removesuffix(".gz").endswith(".jsonl"):
        docs = [text]
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{p} line {n}: field 'text' is missing or not a string")
            docs.append(row["text"])
    if not any(d.strip() for d in docs):
        raise DataError(f"{p}: no text to measure (data.general_eval)")
    return docs


def general_blocks(docs: Sequence[str], tokenizer, block_size: int) -> list[list[int]]:
    """Token blocks to score: each document tokenized alone (the tokenizer's own special tokens,
    e.g. a BOS, no EOS added) and cut into consecutive ``block_size`` blocks; the last, shorter one
    is kept when it has a target (2+ tokens). A block's first token has no context and is not scored.
    Deterministic: a pure function of the text, the tokenizer and ``block_size`` (= data.max_length)."""
    blocks = []
    for doc in docs:
        if not doc.strip():
            continue
        ids = tokenizer(doc)["input_ids"]
        blocks += [ids[i : i + block_size] for i in range(0, len(ids), block_size) if len(ids[i : i + block_size]) > 1]
    return blocks


@torch.no_grad()
def perplexity(model, blocks: Sequence[Sequence[int]], batch_size: int, pad_id: int, accelerator=None,
               device: torch.device | str | None = None) -> tuple[float, int]:
    """``exp(sum of token NLLs / targets)`` over all blocks, and the number of targets.

    With several processes, block ``k`` runs on rank ``k mod world`` and the NLL sum and target
    count are all-reduced, so every rank gets the same number (weighted per token, not per block).
    Every rank runs the same number of forwards, as a sharded model (FSDP2, ZeRO-3) needs: one
    rank may hold a block more than another, and one batch more; a rank short of a batch runs the
    first blocks again and discards the result.
    """
    from orpo.loss import token_logps_from_logits

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = device or (accelerator.device if accelerator else next(model.parameters()).device)
    mine = [b for k, b in enumerate(blocks) if k % world == rank]
    rounds = math.ceil(math.ceil(len(blocks) / world) / batch_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, rounds * batch_size, batch_size):
            real = i < len(mine)
            rows = mine[i : i + batch_size] if real else list(blocks[:batch_size])
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
                labels[j, : len(r) - 1] = torch.tensor(r[1:])
                mask[j, : len(r)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logps = token_logps_from_logits(logits, labels.to(device))
            if real:
                sums += torch.stack([-logps.sum().double(), (labels != -100).sum().to(device, torch.float64)])
    finally:
        model.train(was_training)
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    nll, count = sums.tolist()
    return math.exp(nll / max(count, 1)), int(count)


class GeneralEval(Watcher):
    """``data.general_eval``: ``eval_general_ppl`` in every eval row, and ``forgetting`` when it
    rises past ``forgetting_factor`` x its first (step-0) value."""

    code = "forgetting"

    def __init__(self, path: str, health: HealthConfig | None):
        self.path, self.health = path, health
        self.blocks: list[list[int]] = []

    def on_setup(self, trainer: Trainer) -> None:
        docs = read_general_text(self.path)
        self.blocks = general_blocks(docs, trainer.tokenizer, trainer.cfg.data.max_length)

    def eval_metrics(self, trainer: Trainer) -> dict[str, float]:
        t = trainer.cfg.train
        acc = trainer.accelerator
        # the model without its DDP wrapper (no buffer broadcasts for a forward without backward),
        # under the run's autocast; a sharded one (FSDP2 in place) gathers its weights in each forward
        with acc.autocast():
            ppl, _ = perplexity(acc.unwrap_model(trainer.model), self.blocks, t.eval_batch_size or t.batch_size,
                                trainer.tokenizer.pad_token_id, accelerator=acc)
        return {"eval_general_ppl": ppl}

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        ppl = row["eval_general_ppl"]
        mem = trainer.state.watchers.get(self.code)
        if mem is None or mem["file"] != self.path:  # the first measurement (or another file after a resume)
            mem = trainer.state.watchers[self.code] = {"file": self.path, "step": row["step"], "ppl": ppl}
        if self.health is None or self.code in trainer.state.warnings or not math.isfinite(ppl):
            return
        if ppl > self.health.forgetting_factor * mem["ppl"]:
            trainer.warn(self.code, (
                f"perplexity on {Path(self.path).name} (data.general_eval) rose from {mem['ppl']:.3f} at step "
                f"{mem['step']} to {ppl:.3f} ({ppl / mem['ppl']:.2f}x): the model is forgetting general text; "
                "lower the learning rate or λ, train fewer steps, or mix general data into training"))


# ---------------------------------------------------------------------------------------------
# The best checkpoint


class BestCheckpoint(Watcher):
    """``train.save_best``: ``OUTPUT_DIR/best/`` holds the model of the best eval so far.

    Better means strictly lower (losses, ppl) or higher (accuracy, margin, ...; ``config.metric_goal``)
    than the best so far, so a tie keeps the earlier step. The folder is written like ``final/``
    (standard HF folder or adapter, tokenizer, model card) and atomically; the best value and its
    step are in ``state.watchers["best"]``, so a resumed run compares against the same record.
    """

    def __init__(self, metric: str):
        self.metric = metric
        goal = metric_goal(metric)
        assert goal is not None  # TrainConfig refuses a metric without a direction
        self.goal = goal

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.metric not in row:
            names = ", ".join(k for k in row if k.startswith("eval_"))
            raise ConfigError(f"train.save_best: this run has no eval metric '{self.metric}' (it has: {names})")
        value = row[self.metric]
        if value is None or not math.isfinite(value):
            return
        best = trainer.state.watchers.get("best")
        if best is not None and best["metric"] == self.metric:
            better = value < best["value"] if self.goal == "min" else value > best["value"]
            if not better:
                return
        trainer.save_model(trainer.output_dir / "best", eval_row=row)
        trainer.state.watchers["best"] = {"metric": self.metric, "value": value, "step": row["step"]}

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        best = trainer.state.watchers.get("best")
        if best is not None:
            result.notes.append(f"best model     {trainer.output_dir / 'best'} ({self.metric} "
                                f"{best['value']:.4f} at step {best['step']})")


def build(cfg: Config) -> list[Watcher]:
    """The watchers of this module the config asks for, in calling order."""
    h = cfg.train.health
    checks: list[Watcher] = []
    if h.enabled:
        all_checks = {"instruct_start": InstructStart(), "lambda_too_high": LambdaTooHigh(h),
                      "rejected_rising": RejectedRising(h), "no_separation": NoSeparation(h),
                      "grad_spikes": GradSpikes(h)}
        checks = [w for code, w in all_checks.items() if code not in h.ignore]
    forgetting = h if h.enabled and "forgetting" not in h.ignore else None
    general = [GeneralEval(cfg.data.general_eval, forgetting)] if cfg.data.general_eval else []
    best = [BestCheckpoint(cfg.train.save_best)] if cfg.train.save_best else []
    return [*general, *checks, *best]
