"""The ORPO training recipe on Accelerate: set up in dependency order, then one loop.

    setup()   run folder checked (read only) -> engine (accelerator) -> resume decision -> tokenizer
              -> data -> model -> engine.prepare (wrap/shard + optimizer) -> scheduler -> checkpoint
              state -> watchers' inputs -> run folder claimed, locked (and cleared) -> logger
    train()   [eval at step 0] -> per step: fetch grad_accum micro-batches -> _step -> _log
              -> evaluate / save_checkpoint when due -> watchers -> [final eval] -> watchers' on_finish
              (the final benchmarks) -> save_final -> summary

The objective (``Objective``, default from ``cfg.orpo``) and the batch layout (``data.layout``,
``data/collate.py``) are passed in, so a new objective or layout never means a new trainer; what
watches a run (health warnings, samples, benchmarks, the best checkpoint, signals) is a ``Watcher``
(``orpo.train.watch``) called at fixed moments, so the loop stays this one screen. Gradient
accumulation and data parallelism never change the loss: each micro-batch's terms are divided by
the token and pair counts of the whole optimizer step, over all micro-batches and all processes.

Reproducible: the data order is a pure function of (seed, epoch), every RNG is checkpointed, so
the same config gives the same metrics and a resumed run continues the uninterrupted one step for
step. A step with a non-finite loss or gradient norm is skipped, not applied (``_optimizer_step``);
no checkpoint is written during a streak of them (``_save_due``), and too long a streak stops the
run naming the last checkpoint from before it (``_check_divergence``).
The loop syncs with the device once per optimizer step (that finiteness check) and reads the
metrics back only on logged steps.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from torch.utils.data import DataLoader

from orpo import disk
from orpo.config import Config, ConfigError
from orpo.data.collate import TOKEN_COLUMNS, Layout, PreferenceBatch, on_device, pair_tokens, resolve_layout
from orpo.train import checkpoint as ckpt
from orpo.train import resume, trackers
from orpo.train.distributed import Engine, build_engine, estimate_memory, full_state_dict
from orpo.train.divergence import diverged
from orpo.train.evaluate import evaluate
from orpo.train.forward import configure_logps
from orpo.train.logger import METRICS_FILE, MetricsLogger, ProgressBar, Throughput, check_report_to
from orpo.train.model import (
    adapt_given_model,
    describe_lora,
    disable_dropout,
    ensure_pad_token,
    is_peft_model,
    load_model,
    load_tokenizer,
    logits_keep_mode,
)
from orpo.train.objective import SHARED_PAIR_METRICS, MetricSums, Objective, build_objective
from orpo.train.optim import build_optimizer, build_scheduler, check_optimizer, check_schedule
from orpo.train.watch import StepCallback, Watcher, build_watchers

ROW_COLUMNS = list(TOKEN_COLUMNS)  # per-pair values (DPO's reference log-probs) are added as columns later


class TrainData(Protocol):
    """What the trainer needs from ``orpo.data.pipeline.PreparedData``."""

    train: Any  # datasets.Dataset with ROW_COLUMNS
    eval: Any | None
    fingerprint: str


class TrainingStopped(RuntimeError):
    """A watcher asked the run to stop before its last step (e.g. on SIGTERM); the message says how to go on."""


# ---------------------------------------------------------------------------------------------
# Data order


def epoch_micro_batches(num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                        num_processes: int = 1, lengths: list[int] | None = None,
                        max_tokens: int | None = None) -> list[list[int]]:
    """Row indices of this rank's micro-batches in ``epoch``: a pure function of its arguments.

    The order is a permutation from a generator seeded with ``seed + epoch`` (never the global
    RNG), so a resumed run can rebuild it and skip to any micro-batch. Each global micro-batch of
    ``batch_size * num_processes`` rows is dealt out round-robin; the last, smaller one is kept
    (the loss is normalized by token counts, so a short batch weighs what its tokens weigh) unless
    some rank would get nothing. With ``max_tokens`` (and each row's tokens in ``lengths``), see
    ``token_budget_batches``.
    """
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if max_tokens is not None:
        assert lengths is not None, "a token budget needs the rows' lengths"
        return token_budget_batches(perm, lengths, max_tokens, num_processes)[rank::num_processes]
    chunk = batch_size * num_processes
    chunks = [perm[i : i + chunk] for i in range(0, num_rows, chunk)]
    if chunks and len(chunks[-1]) < num_processes:
        chunks.pop()
    return [c[rank::num_processes] for c in chunks]


def token_budget_batches(order: list[int], lengths: list[int], max_tokens: int, num_processes: int) -> list[list[int]]:
    """Rows in ``order`` cut into micro-batches of at most ``max_tokens`` tokens (a longer row alone).

    Rank ``r`` takes micro-batches ``r, r + W, ...``, so every rank must get the same number (DDP
    steps together): when the last ``W`` are incomplete, the micro-batches with the most rows are
    split in two (which never passes the budget) until there are ``W``, or, with fewer rows than
    ranks left, those rows are dropped for this epoch, as with a fixed batch size.
    """
    batches: list[list[int]] = []
    used = max_tokens
    for i in order:
        if used + lengths[i] > max_tokens:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += lengths[i]
    whole = len(batches) // num_processes * num_processes
    tail = batches[whole:]
    while tail and len(tail) < num_processes:
        j = max(range(len(tail)), key=lambda k: len(tail[k]))
        if len(tail[j]) < 2:
            break
        half = len(tail[j]) // 2
        tail[j : j + 1] = [tail[j][:half], tail[j][half:]]
    return batches[:whole] + (tail if len(tail) == num_processes else [])


@dataclass
class DataPosition:
    epoch: int
    micro_batch: int  # the next micro-batch of `epoch` to use


def _collate(rows, layout: Layout, objective: Objective, keep_mode: str | None) -> PreferenceBatch:
    return objective.prepare(layout(rows), keep_mode)


class MicroBatchStream:
    """An endless stream of collated micro-batches, epoch after epoch, from a given position."""

    def __init__(self, dataset, collate: Callable, order: Callable[[int], list[list[int]]], seed: int,
                 num_workers: int, start: DataPosition):
        """``order(epoch)``: this rank's micro-batches of that epoch (``epoch_micro_batches``)."""
        self.dataset, self.collate, self.order, self.seed = dataset, collate, order, seed
        self.num_workers, self.start = num_workers, start

    def __iter__(self) -> Iterator[tuple[PreferenceBatch, DataPosition]]:
        epoch, first = self.start.epoch, self.start.micro_batch
        while True:
            whole = self.order(epoch)  # with a token budget, epochs differ in their number of micro-batches
            per_epoch, order = len(whole), whole[first:]
            # A DataLoader draws a base seed for its workers from its generator at every iter():
            # give it its own so the global RNG (dropout) is untouched by where the run resumed.
            # pinned batches let PreferenceBatch.to copy to the GPU without blocking the host
            loader = DataLoader(self.dataset, batch_sampler=order, collate_fn=self.collate,
                                num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                                pin_memory=torch.cuda.is_available())
            for i, batch in enumerate(loader):
                done = first + i + 1
                yield batch, (DataPosition(epoch, done) if done < per_epoch else DataPosition(epoch + 1, 0))
            epoch, first = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    """The closing summary of a run (also printed)."""

    steps: int
    skipped_steps: int
    time_s: float  # wall time of train(), eval and saving included
    tokens: int  # real (non-pad) tokens of this run's steps, all processes
    tokens_per_s: float  # over the time spent in optimizer steps
    peak_memory_bytes: int
    peak_memory_kind: str  # "CUDA max allocated" or "process peak RSS"
    best_eval: dict[str, float] | None
    final_dir: Path | None
    output_dir: Path
    last_metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # watchers' closing lines (best checkpoint, ...)
    warnings: dict[str, str] = field(default_factory=dict)  # run-health code -> message (this run and before a resume)

    def render(self) -> str:
        lines = [
            f"steps          {self.steps} ({self.skipped_steps} skipped)",
            f"time           {self.time_s:.1f} s",
            f"throughput     {self.tokens_per_s:,.0f} tokens/s ({self.tokens:,} tokens)",
            f"peak memory    {self.peak_memory_bytes / 2**20:,.0f} MiB ({self.peak_memory_kind})",
        ]
        if self.best_eval:
            b = self.best_eval
            lines.append(f"best eval      step {b['step']}: loss {b['eval_loss']:.4f}, "
                         f"accuracy {b['eval_accuracy']:.3f}")
        lines.append(f"model          {self.final_dir or '(not saved: train.save_final is false)'}")
        lines.append(f"metrics        {self.output_dir / 'metrics.jsonl'}")
        lines += [f"{'warnings' if i == 0 else '':<15}[{code}] {message}"
                  for i, (code, message) in enumerate(self.warnings.items())]
        lines += self.notes
        return "\n".join(lines)


@dataclass
class StepOutput:
    sums: MetricSums
    grad_norm: torch.Tensor
    lr: float


# ---------------------------------------------------------------------------------------------
# The recipe


class Trainer:
    """ORPO training of one model on one prepared dataset; see the module docstring for the stages.

    ``data``: an already prepared dataset (default: ``prepare_data(cfg.data, ...)``);
    ``train_data`` / ``eval_data``: rows in memory (``datasets.Dataset``, pandas DataFrame, list of
    dicts) instead of ``data.train`` / ``data.eval``, through the same pipeline;
    ``model`` / ``tokenizer``: already loaded objects instead of ``model.name_or_path`` (``model.lora``,
    ``model.dtype``, ``gradient_checkpointing`` and ``chat_template`` still apply; the model object is
    trained in place);
    ``objective`` / ``layout``: default ``build_objective(cfg.orpo)`` / the layout ``data.layout`` names;
    ``watchers``: extra ``Watcher``s (see ``orpo.train.watch``) after the ones the config asks for;
    ``on_step_end(trainer)``: called after each step's logging, eval and checkpoint (tests use it
    to interrupt a run).
    """

    # set by setup(), in this order
    engine: Engine  # single / ddp / fsdp2 / zero2 / zero3 (distributed.py)
    accelerator: Accelerator
    resume_from: Path | None
    tokenizer: Any
    layout: Layout
    data: TrainData
    model: Any  # plain, PEFT, then wrapped or sharded by engine.prepare: engine.unwrap gets the model
    optimizer: Any
    scheduler: Any
    total_steps: int
    state: ckpt.TrainState
    logger: MetricsLogger | None

    def __init__(self, cfg: Config, *, data: TrainData | None = None, train_data: Any = None, eval_data: Any = None,
                 model: Any = None, tokenizer: Any = None, objective: Objective | None = None,
                 layout: Layout | None = None, console: Console | None = None, watchers: Sequence[Watcher] = (),
                 on_step_end: Callable[[Trainer], None] | None = None, progress: bool = True):
        self.cfg = cfg
        self._given_data, self._given_layout = data, layout
        self._given_rows = (train_data, eval_data)
        self._given_model, self._given_tokenizer = model, tokenizer
        self.objective: Objective = objective or build_objective(cfg.orpo)
        self.console = console or Console(stderr=True)
        self.watchers: list[Watcher] = [*build_watchers(cfg), *watchers] + (
            [StepCallback(on_step_end)] if on_step_end else [])
        self.show_progress = progress
        self.output_dir = Path(cfg.train.output_dir)
        self.lock: disk.FolderLock | None = None  # on the run folder, from the end of setup to the end of train
        self._run_marker: dict[str, Any] | None = None  # the run folder's marker as set-up found it
        self.stop_request: tuple[str, bool] | None = None
        # a watcher's request to end the run normally after this step (early stopping)
        self.finish_request: str | None = None
        self._epoch_done = False  # whether the last optimizer step completed an epoch
        self.last_eval: dict[str, Any] | None = None  # the newest eval row (the model card's numbers)

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        check_report_to(self.cfg.train.report_to)
        # a folder orpo may not write to is said before anything loads
        self._run_marker = resume.inspect_run_dir(self.output_dir)
        self._setup_accelerator()
        # the optimizer and schedule keys are checked before anything loads (a CUDA-only optimizer on a CPU)
        check_optimizer(self.cfg.train, self.accelerator.device)
        check_schedule(self.cfg.train)
        self.resume_from = resume.resolve_resume(self.cfg, verify=partial(ckpt.inspect_checkpoint,
                                                                        accelerator=self.accelerator),
                                               report=self._print)
        self._setup_tokenizer()
        self._setup_data()
        self._setup_model()
        starting_weights = self._reference_key()
        self.model, self.optimizer = self.engine.prepare(self.model, partial(build_optimizer, cfg=self.cfg.train))
        self._setup_reference(starting_weights)
        self._setup_scheduler()
        self._setup_state()
        self._setup_logger()
        return self

    def _setup_accelerator(self) -> None:
        self.engine = build_engine(self.cfg)
        self.accelerator = self.engine.accelerator
        if self.accelerator.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # Accelerate turns fp16 off on the CPU without a word (no autocast, no GradScaler), so the
            # run would be fp32. torch has both there: turn them on before prepare() wraps the model.
            self.accelerator.native_amp = True
            self.accelerator.scaler = torch.amp.GradScaler("cpu")
        self.is_main = self.accelerator.is_main_process
        set_seed(self.cfg.train.seed)
        self._print(self.engine.describe())

    def _print(self, text: str) -> None:
        if self.is_main:
            self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    def _setup_tokenizer(self) -> None:
        if self._given_tokenizer is not None:
            self.tokenizer = self._given_tokenizer
            ensure_pad_token(self.tokenizer)
        else:
            self.tokenizer = load_tokenizer(self.cfg.model)

    def _setup_data(self) -> None:
        if self._given_data is not None:
            self.data = self._given_data
        else:
            from orpo.data.pipeline import prepare_data

            with self.accelerator.main_process_first():
                self.data = prepare_data(self.cfg.data, self.tokenizer, chat_template=self.cfg.model.chat_template,
                                         seed=self.cfg.train.seed, console=self.console if self.is_main else None,
                                         train_data=self._given_rows[0], eval_data=self._given_rows[1])
        summary = getattr(self.data, "summary", None)
        if summary is not None:
            self._print(summary.render())
        self.train_data = self.data.train.select_columns(ROW_COLUMNS)
        self.eval_data = self.data.eval.select_columns(ROW_COLUMNS) if self.data.eval is not None else None
        if self.eval_data is not None and len(self.eval_data) == 0:
            self.eval_data = None
        if self.cfg.train.eval_every is not None and self.data.eval is None:
            raise ConfigError("train.eval_every needs eval data: set data.eval or data.eval_fraction, or pass eval_data")
        world = self.accelerator.num_processes
        if len(self.train_data) < world:
            raise ConfigError(f"the training set has {len(self.train_data)} pairs, fewer than the {world} processes")
        t, acc = self.cfg.train, self.accelerator
        budget = t.max_tokens_per_batch
        self.epoch_order = partial(epoch_micro_batches, len(self.train_data), t.batch_size, t.seed,
                                   rank=acc.process_index, num_processes=world, max_tokens=budget,
                                   lengths=pair_tokens(self.train_data) if budget else None)

    def _setup_model(self) -> None:
        acc = self.accelerator
        device_map = {"": acc.local_process_index} if self.cfg.model.load_in_4bit else None
        if self._given_model is not None:
            model = adapt_given_model(self._given_model, self.cfg.model, self.tokenizer)
        else:
            model = load_model(self.cfg.model, self.tokenizer, seed=self.cfg.train.seed, device_map=device_map)
        if not self.cfg.model.load_in_4bit and self.engine.places_model:
            model.to(acc.device)  # before the optimizer, which picks the fused kernel by device
        model.train()
        # train.disable_dropout (default: on with a reference, as TRL's): the reference log-probs are
        # of the model without dropout, so the policy's are taken alike
        off = self.cfg.train.disable_dropout
        if off or (off is None and bool(getattr(self.objective, "reference_columns", ()))):
            disable_dropout(model)
        self.keep_mode = logits_keep_mode(model)
        logps = configure_logps(model, self.cfg.train.logps, self.cfg.train.logps_chunk_size,
                                engine=self.engine.name, device=acc.device)
        if logps.note:
            self._print(logps.note)
        # Built here, not with the data: a padding-free layout hands attention to the model in the
        # form its backend reads (4D mask, BlockMask or varlen), known once the model is loaded.
        if self._given_layout is not None:
            self.layout = self._given_layout
        else:
            self.layout, line = resolve_layout(self.cfg.data.layout, model, self.tokenizer.pad_token_id,
                                               self.cfg.data.max_length)
            self._print(line)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._print(f"model: {total:,} parameters, {trainable:,} trainable"
                    f"{' (LoRA)' if is_peft_model(model) else ''}, on {acc.device}")
        if is_peft_model(model):
            self._print(describe_lora(model))
        memory = estimate_memory(model, self.engine, self.cfg.train.optimizer)
        self._print(memory.line(self.engine))
        if self.engine.sharded and is_peft_model(model) and self.cfg.model.init is not None:
            raise ConfigError(f"LoRA on a fresh model.init under {self.engine.name}: final/ would need the "
                              "sharded base weights as well; use a pretrained model.name_or_path, or ddp")
        from orpo.train.speed import apply_speed_switches

        # train.use_liger_kernel, neftune_noise_alpha, torch_compile; a watcher undoes them at the end
        self.watchers.append(apply_speed_switches(model, self.cfg.train, acc.device))
        self.model = model

    def _reference_key(self) -> str | None:
        """The hash of the starting weights that keys DPO's cached reference log-probs, taken before
        ``engine.prepare`` shards or wraps them (so every engine and process count shares the cache)."""
        if not getattr(self.objective, "reference_columns", ()):
            return None
        from orpo.train.reference import weights_fingerprint

        return weights_fingerprint(self.model)

    def _setup_reference(self, starting_weights: str | None) -> None:
        """An objective with a reference (DPO) gets the starting weights' log-probs as columns.

        After ``engine.prepare``, so the pass runs where training runs (a sharding engine places the
        model on the GPUs itself: before prepare it is whole, on the CPU), and before ``_setup_state``
        loads a checkpoint, so the weights are still the starting ones.
        """
        if starting_weights is None:
            return
        from orpo.train.reference import add_reference_logps

        t = self.cfg.train
        splits = add_reference_logps(
            self.model, {"train": self.train_data, "eval": self.eval_data}, self.layout, self.objective,
            t.eval_batch_size or t.batch_size, self.accelerator, self.keep_mode,
            cache_dir=getattr(self.data, "cache_path", None), data_fingerprint=self.data.fingerprint,
            console=self.console if self.is_main else None, weights_key=starting_weights)
        self.train_data, self.eval_data = splits["train"], splits["eval"]

    def _setup_scheduler(self) -> None:
        t = self.cfg.train
        epochs = t.epochs or 1.0
        # equal in every epoch unless a token budget packs them: one shuffle, not one per epoch (10,000 at most)
        epoch_counts = range(math.ceil(epochs)) if t.max_tokens_per_batch else range(1)
        counts = [len(self.epoch_order(e)) for e in epoch_counts]
        counts += counts[-1:] * (math.ceil(epochs) - len(counts))
        self.micro_batches_per_epoch = counts[0]
        micro_batches = sum(counts[:-1]) + (epochs - len(counts) + 1) * counts[-1]
        self.total_steps = t.max_steps or math.ceil(micro_batches / t.grad_accum)
        # Stepped by hand once per optimizer step and never passed to accelerator.prepare(), whose
        # wrapper would step it once per process. Built on the plain torch optimizer, which every
        # engine's wrapper (DeepSpeed's too) reads its learning rate from.
        self.scheduler = build_scheduler(self.engine.torch_optimizer, t, self.total_steps)

    def _setup_state(self) -> None:
        acc = self.accelerator
        if self.resume_from is not None:
            rows = len(self.train_data)
            self.state = resume.check_resume_compatible(
                self.resume_from, self.cfg, self.data.fingerprint, acc.num_processes, self.engine.name,
                lambda bs, n: len(epoch_micro_batches(rows, bs, self.cfg.train.seed, 0, 0, n)))
            finished = resume.finished_step(self.output_dir, self._run_marker)
            # a run that stopped early (train.early_stopping) is finished too: auto never trains it on
            early = (self._run_marker or {}).get("finished_early") if self.cfg.train.resume == "auto" else None
            if finished is not None and (self.state.step >= self.total_steps or early):
                raise resume.finished_run(self.output_dir, finished, early)
            note = ckpt.load_checkpoint(self.engine, self.resume_from, self.model, self.optimizer, self.scheduler,
                                        self.state.num_processes)
            self._print(f"resumed from {self.resume_from} (step {self.state.step})" + (f": {note}" if note else ""))
            # From here on the checkpoints this run writes describe this run's processes and engine.
            self.state.num_processes, self.state.engine = acc.num_processes, self.engine.name
        else:
            self.state = ckpt.TrainState(data_fingerprint=self.data.fingerprint, num_processes=acc.num_processes,
                                         engine=self.engine.name)

    def _setup_logger(self) -> None:
        """Last, after every input was checked (the watchers' too): only now is the run folder claimed,
        locked and, with ``train.overwrite``, cleared of what the previous run made."""
        self.logger = None
        self._notify("on_setup")
        if self.is_main:
            out, what = self.output_dir, ckpt.WHAT
            self.lock = resume.claim_run_dir(out, start_over=self.resume_from is None and self.cfg.train.overwrite)
            disk.write_atomic(disk.child(out, "config.yaml", what), ckpt.dump_config(self.cfg).encode())
            summary = getattr(self.data, "summary", None)
            if summary is not None:
                text = json.dumps(summary.to_dict(), indent=2)
                disk.write_atomic(disk.child(out, "data_summary.json", what), text.encode())
            for name in [METRICS_FILE, *trackers.folders(self.cfg.train.report_to)]:
                disk.child(out, name, what)
            t = self.cfg.train
            self.logger = MetricsLogger(out, t.report_to, self.cfg.model_dump(mode="json"),
                                        resume_step=self.state.step if self.resume_from else None,
                                        run_name=t.run_name, project=t.project, tags=t.tags)
        self.accelerator.wait_for_everyone()

    # -- train ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        t = self.cfg.train
        started = time.perf_counter()
        tokens_at_start, seconds_at_start = self.state.tokens_seen, self.state.train_seconds
        self.throughput = Throughput()
        size = f"(<= {t.max_tokens_per_batch} tokens)" if t.max_tokens_per_batch else t.batch_size
        self._print(f"training {self.total_steps} steps of {size} x {t.grad_accum} x "
                    f"{self.accelerator.num_processes} pairs (from step {self.state.step})")
        self.bar = bar = ProgressBar(self.total_steps, self.state.step, self.console,
                                     enabled=self.is_main and self.show_progress)
        try:
            with bar:
                self._notify("on_start")
                if self.state.step == 0 and self.eval_data is not None:
                    self.evaluate()
                stream = self._micro_batches()
                row = None
                self._save_deferred = False
                while self.state.step < self.total_steps and self.finish_request is None:
                    fetched = [next(stream) for _ in range(t.grad_accum)]
                    step_started = time.perf_counter()
                    out = self._step([b for b, _ in fetched])
                    self._advance(fetched[-1][1], out, time.perf_counter() - step_started)
                    logged = self._log(out)
                    row = logged or row
                    bar.update(self.state.step, row)
                    self._check_divergence()
                    if self.due(t.eval_every) and self.eval_data is not None:
                        self.evaluate()
                    if self._save_due():
                        self.save_checkpoint()
                    self._notify("on_step", logged)
                    if self.stop_request is not None:
                        self._stop()
                if self.eval_data is not None and self.state.last_eval_step != self.state.step:
                    self.evaluate()
                self._notify("on_finish")
            final_dir = self.save_final() if t.save_final else None
            result = self._result(time.perf_counter() - started, self.state.tokens_seen - tokens_at_start,
                                  self.state.train_seconds - seconds_at_start, final_dir, row)
            self._notify("on_end", result)
        finally:
            self._notify("on_close")
            if self.logger is not None:
                self.logger.close()
            if self.lock is not None:
                self.lock.release()
        self._print(result.render())
        return result

    def _notify(self, moment: str, *args: Any) -> None:
        for watcher in self.watchers:
            getattr(watcher, moment)(self, *args)

    # -- what watchers may call -------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        """Append a row (it must hold ``step``) to metrics.jsonl and the trackers; main process only."""
        if self.logger is not None:
            self.logger.log(row)

    def say(self, text: str) -> None:
        """A line on the console, from the main process (beside the progress bar)."""
        self._print(text)

    def warn(self, code: str, message: str) -> bool:
        """Report a run-health finding once per run (resumes included): printed, logged, in the summary.

        Returns whether it was new. Every rank keeps the same list, so call it on every rank.
        """
        if code in self.state.warnings:
            return False
        self.state.warnings[code] = message
        self.log({"step": self.state.step, "warning": code, "message": message})
        self._print(f"warning [{code}] at step {self.state.step}: {message}")
        return True

    def request_stop(self, reason: str, checkpoint: bool = True) -> None:
        """Stop after the current step (every rank must ask); ``checkpoint``: write one first."""
        self.stop_request = (reason, checkpoint)

    def request_finish(self, reason: str) -> None:
        """End the run normally after the current step (every rank must ask): final eval and save, summary."""
        self.finish_request = reason

    def _stop(self) -> None:
        assert self.stop_request is not None
        reason, checkpoint = self.stop_request
        saved = None
        if checkpoint:
            newest = ckpt.list_checkpoints(self.output_dir)
            done = bool(newest) and newest[-1].name == f"step-{self.state.step}"
            saved = newest[-1] if done else self.save_checkpoint()
        how = (f"resume with train.resume=auto (from {saved})" if saved is not None
               else "no checkpoint was written")
        raise TrainingStopped(f"stopped at step {self.state.step} of {self.total_steps}: {reason}; {how}")

    def _micro_batches(self) -> Iterator[tuple[PreferenceBatch, DataPosition]]:
        """This rank's micro-batches from the saved data position on (collated + prepared on the CPU)."""
        t = self.cfg.train
        # BlockMasks are built on the model's device, unless workers collate (they cannot use CUDA)
        layout = on_device(self.layout, self.accelerator.device) if t.num_workers == 0 else self.layout
        collate = partial(_collate, layout=layout, objective=self.objective, keep_mode=self.keep_mode)
        return iter(MicroBatchStream(self.train_data, collate, self.epoch_order, t.seed, t.num_workers,
                                     DataPosition(self.state.epoch, self.state.micro_batch)))

    def _step(self, micro_batches: list[PreferenceBatch]) -> StepOutput:
        """One optimizer step: forward/backward every micro-batch, clip, update (or skip)."""
        sums = self._forward_backward(micro_batches)
        grad_norm = self.engine.clip_grad_norm_(self.model, self.cfg.train.max_grad_norm)
        sums.reduce(self.accelerator)
        lr = self.scheduler.get_last_lr()[0]
        self._optimizer_step(sums, grad_norm)
        return StepOutput(sums=sums, grad_norm=grad_norm.detach(), lr=lr)

    def _forward_backward(self, micro_batches: list[PreferenceBatch]) -> MetricSums:
        """Accumulate the gradient of the whole step's loss, normalized by the step's global counts."""
        acc = self.accelerator
        device, world = acc.device, acc.num_processes
        nll_tokens = [self.objective.nll_tokens(b) for b in micro_batches]  # counted on the CPU: no sync
        # built on the CPU, then copied without blocking (torch.tensor(..., device=cuda) would wait)
        counts = torch.tensor([sum(nll_tokens), sum(b.num_pairs for b in micro_batches)], dtype=torch.float32)
        counts = counts.to(device, non_blocking=True)
        if world > 1:
            counts = acc.reduce(counts, reduction="sum")
        nll_den, or_den = counts.clamp(min=1).unbind()
        sums = MetricSums(self.objective, device)
        for i, (batch, n_tok) in enumerate(zip(micro_batches, nll_tokens, strict=True)):
            with self.engine.micro_batch(self.model, last=i == len(micro_batches) - 1):
                out = self.objective(self.model, batch.to(device), token_normalizer=nll_den, pair_normalizer=or_den)
                # Each rank's loss is already divided by the global counts; the engine undoes its
                # own averaging over ranks (and micro-batches), so gradients are of the global sum.
                self.engine.backward(out.loss, grad_accum=len(micro_batches))
            sums.add(out, nll_tokens=n_tok, tokens=batch.num_tokens())
        return sums

    def _optimizer_step(self, sums: MetricSums, grad_norm: torch.Tensor) -> None:
        """Update the weights unless the step's loss or gradient norm is not finite.

        A skipped step zeroes the gradients and leaves weights and AdamW moments as they were;
        the scheduler still advances, so the learning rate stays a function of the step number
        (and a resumed run agrees with an uninterrupted one). Under fp16 an infinite gradient
        norm with a finite loss is the GradScaler's own overflow signal: it skips the update and
        lowers the scale, and the step counts as skipped but not as bad.
        This is the loop's one host sync per optimizer step; with several processes it also reads
        back the step's global counts.
        """
        finite = torch.stack([torch.isfinite(sums.total_loss), torch.isfinite(grad_norm)]).to(torch.float64)
        loss_ok, norm_ok, *counts = torch.cat([finite, sums.unread_counts()]).tolist()
        sums.settle(counts)
        if loss_ok and (norm_ok or self.accelerator.scaler is not None):
            self.optimizer.step()
            skipped, bad = bool(getattr(self.optimizer, "step_was_skipped", False)), False
        else:
            skipped = bad = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.skipped_steps += int(skipped)
        self.state.bad_in_a_row = self.state.bad_in_a_row + 1 if bad else 0

    def _advance(self, position: DataPosition, out: StepOutput, seconds: float) -> None:
        self.state.step += 1
        self._epoch_done = position.epoch > self.state.epoch
        self.state.epoch, self.state.micro_batch = position.epoch, position.micro_batch
        tokens = out.sums.counts[2]
        self.state.tokens_seen += tokens
        self.state.train_seconds += seconds
        self.throughput.add(tokens, seconds)

    def due(self, every: int | str | None) -> bool:
        """Whether a cadence falls on this step: every N optimizer steps, or ``"epoch"``: the step that
        completed an epoch's last micro-batch (the one it falls in, with accumulation)."""
        if every == "epoch":
            return self._epoch_done
        return isinstance(every, int) and self.state.step % every == 0

    def _log(self, out: StepOutput) -> dict[str, Any] | None:
        """Write the step's metrics (the true step values over all micro-batches and ranks)."""
        s = self.state
        if not (self.due(self.cfg.train.log_every) or s.step == self.total_steps or s.bad_in_a_row):
            return None
        m = out.sums.finalize()
        row: dict[str, Any] = {"step": s.step, "epoch": round(s.epoch + s.micro_batch / self.micro_batches_per_epoch, 4)}
        row.update({k: v for k, v in m.items() if k not in MetricSums.COUNTS})
        row.update(lr=out.lr, grad_norm=float(out.grad_norm), tokens_per_s=self.throughput.read(),
                   skipped_steps=s.skipped_steps)
        self.log(row)
        return row

    def _save_due(self) -> bool:
        """Whether to write a checkpoint now. One due during a streak of skipped (non-finite) steps is
        deferred to the first finite step after it, so every checkpoint holds a state that just took
        a finite step and a streak never rotates the last good checkpoint away."""
        self._save_deferred = self._save_deferred or self.due(self.cfg.train.save_every)
        if not self._save_deferred or self.state.bad_in_a_row:
            return False
        self._save_deferred = False
        return True

    def _check_divergence(self) -> None:
        if self.state.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise diverged(self.state, self.cfg, self.resume_from, self.output_dir)

    # -- evaluate / save --------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the whole eval set, logged as ``eval_*`` at the current step."""
        t = self.cfg.train
        m = evaluate(self.model, self.eval_data, self.layout, t.eval_batch_size or t.batch_size,
                     objective=self.objective, accelerator=self.accelerator, keep_mode=self.keep_mode)
        row = {"step": self.state.step, **{f"eval_{k}": v for k, v in m.items()}}
        for watcher in self.watchers:
            row.update(watcher.eval_metrics(self))
        best = self.state.best_eval
        if math.isfinite(row["eval_loss"]) and (best is None or row["eval_loss"] < best["eval_loss"]):
            self.state.best_eval = {"step": self.state.step, "eval_loss": row["eval_loss"],
                                    "eval_accuracy": row["eval_accuracy"]}
        self.log(row)
        own = [k for k in self.objective.pair_metrics if k not in SHARED_PAIR_METRICS]
        extra = "".join(f"  {k.replace('_', ' ')} {m[k]:+.2f}" for k in own)
        self._print(f"step {self.state.step:>5}  eval acc {m['accuracy']:.3f}{extra}  logp chosen "
                    f"{m['logps_chosen']:.2f}  rejected {m['logps_rejected']:.2f}")
        self.state.last_eval_step = self.state.step
        self.last_eval = row
        self._notify("on_eval", row)
        return row

    def save_checkpoint(self) -> Path:
        path = ckpt.save_checkpoint(self.engine, self.output_dir, self.model, self.optimizer, self.scheduler,
                                    self.state, self.cfg, keep=self.cfg.train.save_total_limit)
        self._notify("on_save", path)
        return path

    def save_final(self) -> Path:
        """``OUTPUT_DIR/final``: see ``save_model``; the run's marker then says it finished."""
        folder = self.save_model(self.output_dir / "final", eval_row=self.last_eval)
        if self.is_main:
            disk.set_marker(self.output_dir, finished_step=self.state.step, finished_early=self.finish_request)
        return folder

    def save_model(self, folder: Path, eval_row: dict[str, Any] | None = None, *, in_run: bool = True) -> Path:
        """A standard HF folder (or LoRA adapter) + tokenizer with its chat template + model card
        (README.md, with ``eval_row``'s numbers), written atomically. Every rank calls it; a write that
        fails (a full disk) leaves ``folder`` as it was and raises ``SaveFailed`` on every rank.
        ``in_run=False``: ``folder`` is outside the run folder (a hub push's scratch copy), not recorded there."""
        from orpo.train.card import model_card

        self.accelerator.wait_for_everyone()
        state_dict = full_state_dict(self.engine, self.model)  # every rank takes part when sharded

        def needed() -> tuple[int, str]:
            weights = state_dict if state_dict is not None else self.engine.unwrap(self.model).state_dict()
            return ckpt.tensor_bytes(weights), "its weights"

        with disk.stop_on_write_error(f"the model {folder}", folder, self.accelerator, needed,
                                      next_step=ckpt.resume_hint(self.output_dir)):
            if self.is_main:
                if in_run:
                    disk.child(self.output_dir, folder.name, ckpt.WHAT)
                model = self.engine.unwrap(self.model)
                template = getattr(self.data, "template", None)
                if template is not None and getattr(template, "jinja", None):
                    self.tokenizer.chat_template = template.jinja
                with disk.atomic_dir(folder) as tmp, ckpt.quiet_saving():
                    if is_peft_model(model) and self.cfg.model.init is not None:
                        _save_lora_with_fresh_base(model, tmp, folder)
                    else:
                        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                    self.tokenizer.save_pretrained(tmp)
                    (tmp / "README.md").write_text(model_card(
                        self.cfg, step=self.state.step, eval_row=eval_row, summary=getattr(self.data, "summary", None),
                        warnings=self.state.warnings, adapter=is_peft_model(model),
                        benchmarks=self.state.watchers.get("benchmarks")))
        return folder

    def _result(self, elapsed: float, tokens: int, step_seconds: float, final_dir: Path | None,
                row: dict | None) -> TrainResult:
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated(), "CUDA max allocated"
        else:
            import resource  # POSIX only; Linux reports ru_maxrss in KiB

            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
        return TrainResult(steps=self.state.step, skipped_steps=self.state.skipped_steps, time_s=elapsed,
                           tokens=tokens, tokens_per_s=tokens / max(step_seconds, 1e-9), peak_memory_bytes=peak,
                           peak_memory_kind=kind, best_eval=self.state.best_eval, final_dir=final_dir,
                           output_dir=self.output_dir, last_metrics=row or {}, warnings=dict(self.state.warnings))


def _save_lora_with_fresh_base(model, tmp: Path, final: Path) -> None:
    """A LoRA adapter on a ``model.init`` base: save that base too (``final/base``), or nothing can load it."""
    base = copy.deepcopy(model).unload()
    base.save_pretrained(tmp / "base", safe_serialization=True)
    peft_cfg = model.peft_config["default"]
    old = peft_cfg.base_model_name_or_path
    peft_cfg.base_model_name_or_path = str(tmp / "base")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        peft_cfg.base_model_name_or_path = old
    # point the adapter at where the base will be once the folder is renamed into place
    adapter_config = tmp / "adapter_config.json"
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = str((final / "base").resolve())
    adapter_config.write_text(json.dumps(data, indent=2))


def train(cfg: Config, **kwargs: Any) -> TrainResult:
    """Run ORPO training as configured; see ``Trainer`` for the keyword arguments."""
    return Trainer(cfg, **kwargs).setup().train()
