"""Benchmark ORPO training steps, orpo against TRL's ORPOTrainer in one run; see bench/README.md.

Each (setting, system) runs in its own child process, one at a time, so memory never mixes and
the machine's cores are the thing measured. A system is orpo with one set of config overrides (its
default, the other log-prob paths, every batch layout ``data.layout`` offers) or TRL's ORPOTrainer
(trl 1.16.0 in a throwaway venv under runs/bench/, never in .venv). orpo and trl are imported inside
functions, because the TRL child runs this file with that venv's python.

Every system trains the same fresh model (same config and seed), on the same HH pairs in the same
order, with ``orpo.nll_on_prompt: true`` (TRL's NLL covers the prompt too), so the first-step
losses must agree to 1e-4 relative: the bench checks it and fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl.gz"
TRL_VENV = ROOT / "runs" / "bench" / "trl-venv"  # one for every --out (bench/scaling.py uses several)
TRL_PINS = ["trl==1.16.0", "transformers==5.24.0", "datasets", "accelerate"]
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}  # bf16: 8 bits of mantissa, the two round differently

# The model each setting trains. The tokenizer is always the 8,192-token BPE trained on the HH text
# (same tokens, same pairs in every setting); `vocab` is the model's output size.
_LLAMA = {"arch": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "intermediate_size": 688, "tie_word_embeddings": False}
SETTINGS: dict[str, dict] = {
    "small-vocab": {**_LLAMA, "vocab_size": 8192},
    "large-vocab": {**_LLAMA, "vocab_size": 65536},
    "vocab-151936": {**_LLAMA, "vocab_size": 151936},  # bench/scaling.py: Qwen2.5's vocabulary
    # bench/gpu.sh: the shape of Qwen2.5-0.5B (tied embeddings, GQA 14/2), random init
    "qwen2.5-0.5b": {"arch": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "tie_word_embeddings": True,
                     "vocab_size": 151936},
    # dry runs of the scripts (--settings tiny)
    "tiny": {"arch": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": True, "vocab_size": 16384},
}
TOKENIZER_VOCAB = 8192

# orpo systems: name -> (config overrides, where the LM head runs: "read" = only the positions whose
# log-prob the loss reads, "all" = every padded position). Layouts are added from the config schema.
ORPO_SYSTEMS: dict[str, tuple[dict, str]] = {
    "orpo": ({}, "read"),  # the defaults
    "orpo-logps-full": ({"train": {"logps": "full"}}, "read"),  # logits_to_keep, but [targets, vocab] logits
    "orpo-full-logits": ({"train": {"logps": "full"}, "keep": None}, "all"),  # every [2B, T, V] logit, like TRL
}
TRL_SYSTEMS = ("trl", "trl-liger")  # trl-liger: TrainingArguments.use_liger_kernel (CUDA only)


def orpo_systems() -> dict[str, tuple[dict, str]]:
    """The fixed orpo systems plus ``orpo-layout-<name>`` for each non-default ``data.layout``."""
    from typing import get_args

    from orpo.config import DataConfig

    systems = dict(ORPO_SYSTEMS)
    field = DataConfig.model_fields.get("layout")
    if field is not None:
        for layout in get_args(field.annotation):
            if layout != field.default:
                systems[f"orpo-layout-{layout}"] = ({"data": {"layout": layout}}, "read")
    return systems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--settings", nargs="+", default=["small-vocab", "large-vocab"], choices=list(SETTINGS))
    p.add_argument("--systems", nargs="+", default=None,
                   help="default: every orpo system, and trl (plus trl-liger on cuda)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per system")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence; longer pairs are left out")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and compute (bfloat16: bf16 weights under bf16 autocast, as TRL's bf16=True)")
    p.add_argument("--data", type=Path, default=HH, help="the HH pairs (harmless-dev.jsonl.gz)")
    p.add_argument("--trl-python", help="python with trl 1.16.0 (default: make runs/bench/trl-venv)")
    p.add_argument("--no-trl", action="store_true", help="orpo systems only")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="caches and per-run files")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="cap each child's memory (RLIMIT_DATA); a system that needs more is recorded as out of memory")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: "SETTING/SYSTEM", prints one JSON line
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.warmup < 1 or args.steps < 1 or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error("--warmup and --steps must be at least 1, and --device cuda needs a visible CUDA device")
    return args


# ---------------------------------------------------------------------------------------------
# Memory and FLOPs


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """VmHWM: the peak RSS since the process began or since ``reset_rss_peak``."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        f.write("5")


class StepMemory:
    """Training memory: the peak during training minus the memory just before the first step.

    CPU: RSS (the peak RSS is reset at ``start``, so set-up peaks do not count); CUDA:
    ``torch.cuda.max_memory_allocated``, reset at ``start``.
    """

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import torch

        self.peak_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = rss_now()
            reset_rss_peak()

    def result(self) -> dict:
        import torch

        out = {"peak_rss_mb": max(self.peak_setup, rss_peak()) / 2**20}
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            out.update(peak_mem_mb=(peak - self.before) / 2**20, peak_cuda_mb=peak / 2**20,
                       mem_before_mb=self.before / 2**20)
        else:
            out.update(peak_mem_mb=(rss_peak() - self.before) / 2**20, mem_before_mb=self.before / 2**20)
        return out


def step_work(chosen_lens: list[int], chosen_prompts: list[int], rejected_lens: list[int],
              rejected_prompts: list[int], padded_len: int) -> dict:
    """What one step computes, from its pairs: real tokens, attention (Σ length²), LM-head positions.

    ``read``: the targets the loss reads with nll_on_prompt (every chosen target, the rejected
    response's); ``all``: every position of the padded ``[2B, T]`` batch (what TRL's head computes).
    """
    lens = chosen_lens + rejected_lens
    read = sum(n - 1 for n in chosen_lens) + sum(n - p for n, p in zip(rejected_lens, rejected_prompts, strict=True))
    return {"tokens": sum(lens), "attn": sum(n * n for n in lens), "read": read, "all": len(lens) * padded_len}


def model_flops(work: dict, shape: dict, head: str) -> float:
    """6 × non-embedding params × tokens + causal attention + the LM head where it ran (forward + backward).

    Attention per sequence of length T: QKᵀ and AV are 2·T²·H FLOPs each per layer, halved by the
    causal mask, ×3 for forward + backward = 6·L·H·T². The head: 6·H·V per position it computes.
    """
    h, layers, v = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    return 6 * shape["params_nonembedding"] * work["tokens"] + 6 * layers * h * work["attn"] + 6 * h * v * work[head]


def mm_flops_per_s(device: str, dtype_name: str, n: int = 2048, reps: int = 6) -> float:
    """The best rate of an ``n × n`` matmul: the machine's reachable FLOP/s for this dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Data and model shared by all systems


def build_tokenizer(path: Path, vocab: int, texts: list[str]) -> None:
    """Byte-level BPE of ``vocab`` tokens on the HH text, Llama-style specials, BOS added per sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", model_max_length=1 << 20).save_pretrained(path)


def tokenizer_dir(args: argparse.Namespace) -> Path:
    return args.out / f"tokenizer-{TOKENIZER_VOCAB}"


def model_init(setting: str) -> dict:
    return {k: v for k, v in SETTINGS[setting].items()}


def orpo_config(args: argparse.Namespace, setting: str, system: str, overrides: dict | None = None):
    from orpo.config import load_config

    raw = {
        "model": {"init": model_init(setting), "tokenizer": str(tokenizer_dir(args)), "dtype": args.dtype,
                  "chat_template": "none"},
        # max_length: the packed layouts' row length; FitData tokenizes untruncated and keeps the pairs that fit
        "data": {"train": str(args.data), "max_length": args.max_length, "cache_dir": str(args.out / "data-cache")},
        "orpo": {"beta": 0.1, "nll_on_prompt": True},
        "train": {"output_dir": str(args.out / setting / system), "overwrite": True,
                  "max_steps": args.warmup + args.steps, "batch_size": args.batch_size, "learning_rate": 8e-6,
                  "log_every": 1, "save_final": False, "seed": 42,
                  "mixed_precision": "bf16" if args.dtype == "bfloat16" else "no"},
    }
    for section, values in (overrides or {}).items():
        if section in raw:
            raw[section].update(values)
    return load_config(raw=raw)


class FitData:
    """The prepared HH pairs whose chosen and rejected sequences both fit in ``max_length``."""

    def __init__(self, args: argparse.Namespace, cfg, tokenizer):
        import pyarrow.compute as pc

        from orpo.data.pipeline import prepare_data

        untruncated = cfg.data.model_copy(update={"max_length": 1 << 20})  # a limit no pair reaches
        data = prepare_data(untruncated, tokenizer, chat_template="none", seed=cfg.train.seed)
        longest = pc.max_element_wise(*(pc.list_value_length(data.train.data.column(f"{s}_input_ids"))
                                        for s in ("chosen", "rejected")))
        self.keep = [i for i, n in enumerate(longest.to_pylist()) if n <= args.max_length]
        self.train, self.eval, self.total = data.train.select(self.keep), None, len(data.train)
        self.fingerprint = f"{data.fingerprint}-fit{args.max_length}"


def nonembedding_params(model) -> int:
    """Parameters outside the input embedding and the LM head (counted once when tied)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = {id(p) for m in (inner.get_input_embeddings(), inner.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def measure(marks: list[tuple[float, dict]], warmup: int) -> dict:
    """Rates between the ends of step ``warmup`` and of the last step (the same for orpo and TRL)."""
    t0, t1, steps = marks[warmup - 1][0], marks[-1][0], len(marks) - warmup
    timed = [w for _, w in marks[warmup:]]
    total = {k: sum(w[k] for w in timed) for k in timed[0]}
    return {"steps_timed": steps, "s_per_step": (t1 - t0) / steps, "tokens_per_s": total["tokens"] / (t1 - t0),
            "tokens_per_step": total["tokens"] / steps, "work": total, "seconds": t1 - t0}


class RecordingLayout:
    """Wraps the trainer's batch layout to record what each micro-batch holds (one per step here)."""

    def __init__(self, layout):
        self.layout, self.work = layout, []

    def __getattr__(self, name):
        return getattr(self.layout, name)

    def __call__(self, rows):
        c, r = [len(x["chosen_input_ids"]) for x in rows], [len(x["rejected_input_ids"]) for x in rows]
        self.work.append(step_work(c, [x["chosen_prompt_len"] for x in rows], r,
                                   [x["rejected_prompt_len"] for x in rows], max(c + r)))
        return self.layout(rows)


# ---------------------------------------------------------------------------------------------
# The children


def run_orpo(args: argparse.Namespace, setting: str, system: str) -> dict:
    """One orpo system through the public Trainer; per-step marks from ``on_step_end``."""
    from orpo.train import Trainer, load_tokenizer, read_metrics
    from orpo.train.forward import logps_plan

    overrides, head = orpo_systems()[system]
    cfg = orpo_config(args, setting, system, overrides)
    data = FitData(args, cfg, load_tokenizer(cfg.model))
    marks: list[tuple[float, dict]] = []
    trainer = Trainer(cfg, data=data, progress=False,
                      on_step_end=lambda tr: marks.append((time.perf_counter(), layout.work[len(marks)]))).setup()
    if "keep" in overrides:
        trainer.keep_mode = overrides["keep"]  # no logits_to_keep: the model computes all [2B, T, V] logits
    layout = trainer.layout = RecordingLayout(trainer.layout)
    memory = StepMemory(args.device)
    memory.start()
    trainer.train()
    out = {**measure(marks, args.warmup), **memory.result()}
    rows = [r for r in read_metrics(trainer.output_dir) if "loss" in r and "eval_loss" not in r]
    plan = logps_plan(trainer.model)
    out.update(first_loss=rows[0]["loss"], head=head, params=sum(p.numel() for p in trainer.model.parameters()),
               params_nonembedding=nonembedding_params(trainer.accelerator.unwrap_model(trainer.model)),
               pairs=len(data.train), pairs_total=data.total, keep_mode=trainer.keep_mode,
               logps=plan.describe() if plan else None, layout=type(layout.layout).__name__)
    return out


def run_trl(args: argparse.Namespace, setting: str, system: str) -> dict:
    """TRL's ORPOTrainer on the same tokenizer, pairs, model and seed (run with a trl venv's python)."""
    import datasets
    import torch
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(args))
    # the pairs orpo trains on, as prompt/chosen/rejected text (the parent wrote them)
    ds = datasets.load_dataset("json", data_files=str(args.out / f"fit-{args.max_length}.jsonl"), split="train")
    init = model_init(setting)
    mcfg = AutoConfig.for_model(init.pop("arch"), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, **init)
    dtype = getattr(torch, args.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)  # as orpo's build_model: the same initial weights
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
    tcfg = ORPOConfig(output_dir=str(args.out / setting / system), per_device_train_batch_size=args.batch_size,
                      max_length=args.max_length, beta=0.1, learning_rate=8e-6, max_steps=args.warmup + args.steps,
                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                      dataloader_num_workers=0, seed=42, bf16=args.dtype == "bfloat16",
                      use_liger_kernel=system == "trl-liger")  # TRL defaults to bf16: measure what we train
    trainer = ORPOTrainer(model=model, args=tcfg, train_dataset=ds, processing_class=tok)
    work: list[dict] = []  # per collated batch, in order (the loader may read one ahead)

    def recording(rows, collate=trainer.data_collator):
        batch = collate(rows)
        c, r = batch["chosen_attention_mask"].sum(1).tolist(), batch["rejected_attention_mask"].sum(1).tolist()
        cp, rp = batch["prompt_attention_mask"].sum(1).tolist(), batch["prompt_attention_mask"].sum(1).tolist()
        padded = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        work.append(step_work(c, cp, r, rp, padded))
        return batch

    trainer.data_collator, marks, losses = recording, [], []
    compute_loss = trainer.compute_loss

    def first_loss(*a, **k):
        loss = compute_loss(*a, **k)
        if not losses:
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss

    trainer.compute_loss = first_loss
    memory = StepMemory(args.device)

    class Mark(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            memory.start()

        def on_step_end(self, *_a, **_k):
            marks.append((time.perf_counter(), work[len(marks)]))

    trainer.add_callback(Mark())
    trainer.train()
    out = {**measure(marks, args.warmup), **memory.result()}
    out.update(first_loss=losses[0], head="all", params=sum(p.numel() for p in model.parameters()),
               params_nonembedding=nonembedding_params(model), pairs=len(ds), trl=trl.__version__)
    return out


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers

    setting, system = args.child.split("/")
    out = run_trl(args, setting, system) if system in TRL_SYSTEMS else run_orpo(args, setting, system)
    out.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    print("BENCH " + json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The parent


def prepare(args: argparse.Namespace) -> None:
    """Tokenizer and tokenized data once, so children only read caches; fit-*.jsonl: the pairs, as text."""
    from orpo.data.formats import normalize
    from orpo.data.sources import load_rows
    from orpo.train import load_tokenizer

    pairs = normalize(load_rows(str(args.data)), on_bad_row="skip").pairs  # the order prepare_data keeps them in
    if not (tokenizer_dir(args) / "tokenizer.json").exists():
        build_tokenizer(tokenizer_dir(args), TOKENIZER_VOCAB, [p.prompt + r for p in pairs for r in (p.chosen, p.rejected)])
    cfg = orpo_config(args, args.settings[0], "orpo")
    data = FitData(args, cfg, load_tokenizer(cfg.model))
    assert data.total == len(pairs), "prepare_data dropped other pairs than normalize()"
    with (args.out / f"fit-{args.max_length}.jsonl").open("w") as f:
        f.writelines(json.dumps({"prompt": pairs[i].prompt, "chosen": pairs[i].chosen,
                                 "rejected": pairs[i].rejected}) + "\n" for i in data.keep)


def trl_python(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """A python with trl 1.16.0: --trl-python, else runs/bench/trl-venv (made and reused). (python, why not)."""
    if args.trl_python:
        return args.trl_python, None
    venv = TRL_VENV
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(TRL_PINS):
        return str(python), None
    print(f"making {venv} with {' '.join(TRL_PINS)} (once; needs the package registry) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             # torch first and pinned: the local CPU wheel, not a multi-GB CUDA build pulled in by trl
             [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(python), "-m", "pip", "install", "-q", *TRL_PINS]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, (f"TRL is not measured: `{' '.join(cmd[2:])}` failed ({tail}). It needs the package "
                          "registry once; or pass --trl-python PATH to a python with trl==1.16.0.")
    stamp.write_text(" ".join(TRL_PINS))
    return str(python), None


# How an allocation past the cap (or the kernel's OOM killer, -9) shows in a child's stderr
OOM_MESSAGES = ("can't allocate memory", "MemoryError", "out of memory", "Cannot allocate memory")


def memory_cap(gb: float | None):
    """A ``preexec_fn`` capping the child's data segment (every heap and anonymous mapping) at ``gb`` GiB."""
    if gb is None:
        return None
    limit = int(gb * 2**30)
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run_child(args: argparse.Namespace, python: str, setting: str, system: str, base_argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(ROOT / "src"),
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"] + os.pathsep + env["PYTHONPATH"]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([python, __file__, *base_argv, "--device", args.device, "--child", f"{setting}/{system}"],
                          env=env, capture_output=True, text=True, preexec_fn=memory_cap(args.mem_cap_gb))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        oom = proc.returncode == -9 or any(m in proc.stderr for m in OOM_MESSAGES)
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "oom": oom,
                "mem_cap_gb": args.mem_cap_gb}
    return {**json.loads(line[6:]), "loadavg_1min_before": load, "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    base_argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
    systems = args.systems or [*orpo_systems(), "trl", *(["trl-liger"] if args.device == "cuda" else [])]
    unknown = set(systems) - set(orpo_systems()) - set(TRL_SYSTEMS)
    if unknown:
        sys.exit(f"unknown systems {sorted(unknown)}; choose from {[*orpo_systems(), *TRL_SYSTEMS]}")
    if args.no_trl:
        systems = [s for s in systems if s not in TRL_SYSTEMS]
    uptime = os.getloadavg()
    print(f"load average {uptime[0]:.2f} {uptime[1]:.2f} {uptime[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    prepare(args)
    trl, trl_note = trl_python(args) if any(s in TRL_SYSTEMS for s in systems) else (None, None)
    if trl_note:
        print(trl_note, flush=True)
    import torch

    mm = mm_flops_per_s(args.device, args.dtype if args.device == "cuda" else "float32")
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "mm_gflops": mm / 1e9, "mm_dtype": args.dtype if args.device == "cuda" else "float32",
               "loadavg_at_start": list(uptime), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"torch.mm ({machine['mm_dtype']}, 2048²): {mm / 1e9:,.1f} GFLOP/s", flush=True)
    report: dict = {"machine": machine, "setting": {k: str(v) for k, v in vars(args).items() if k != "child"},
                    "configs": {}}
    for setting in args.settings:
        results: dict = {"model": SETTINGS[setting]}
        for system in systems:
            if system in TRL_SYSTEMS and trl is None:
                results[system] = {"error": trl_note}
                continue
            print(f"{setting:<12} {system:<22}", end=" ", flush=True)
            r = run_child(args, trl if system in TRL_SYSTEMS else sys.executable, setting, system, base_argv)
            if "error" not in r:
                shape = {**SETTINGS[setting], "params_nonembedding": r["params_nonembedding"]}
                flops = model_flops(r["work"], shape, r["head"])
                r.update(model_tflops_per_step=flops / r["steps_timed"] / 1e12,
                         mfu=flops / r["seconds"] / mm)
                print(f"{r['tokens_per_s']:>8,.0f} tokens/s  {r['peak_mem_mb']:>8,.0f} MiB  loss {r['first_loss']:.6f}",
                      flush=True)
            else:
                print("out of memory" if r.get("oom") else "failed", flush=True)
            results[system] = r
            orpo, trl_r = results.get("orpo", {}), results.get("trl", {})
            if "tokens_per_s" in orpo and "tokens_per_s" in trl_r:
                results["ratios"] = {"tokens_per_s": orpo["tokens_per_s"] / trl_r["tokens_per_s"],
                                     "peak_mem": orpo["peak_mem_mb"] / trl_r["peak_mem_mb"]}
            report["configs"][setting] = results
            write_results(args, report, quiet=True)  # so far: a run cut short still leaves its numbers
    failures = check_losses(report, LOSS_RTOL[args.dtype])
    write_results(args, report)
    print_table(report)
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


def check_losses(report: dict, rtol: float) -> list[str]:
    """Every system's first-step loss equals TRL's to ``rtol`` (same model, pairs, NLL on prompt)."""
    failures = []
    for setting, results in report["configs"].items():
        errors = [f"{setting}/{s}: {r['error'].strip().splitlines()[-1]}" for s, r in results.items()
                  if isinstance(r, dict) and "error" in r and r["error"] and s not in TRL_SYSTEMS]
        failures += errors
        ref = results.get("trl", {}).get("first_loss")
        checks = {}
        for system, r in results.items():
            if ref is None or not isinstance(r, dict) or "first_loss" not in r or system == "trl":
                continue
            rel = abs(r["first_loss"] - ref) / abs(ref)
            checks[system] = {"first_loss": r["first_loss"], "trl": ref, "rel_diff": rel, "ok": rel <= rtol}
            if rel > rtol:
                failures.append(f"{setting}/{system}: first-step loss {r['first_loss']:.8f} vs TRL's {ref:.8f} "
                                f"(relative difference {rel:.2e} > {rtol:.0e})")
        results["loss_check"] = checks or "not checked: no TRL result"
    return failures


def write_results(args: argparse.Namespace, report: dict, quiet: bool = False) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(args.results)
    if not quiet:
        print(f"wrote {args.results}")


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{m['cpu_count']} CPUs, torch {m['torch']}, {m['device']}{' ' + m['gpu'] if m['gpu'] else ''}; "
          f"torch.mm {m['mm_gflops']:,.1f} GFLOP/s ({m['mm_dtype']}); load at start {m['loadavg_at_start'][0]:.2f}")
    print(f"{'setting':<13}{'system':<23}{'tokens/s':>10}{'s/step':>8}{'train MiB':>11}{'peak RSS':>10}"
          f"{'MFU':>7}{'first loss':>12}")
    for setting, results in report["configs"].items():
        for system, r in results.items():
            if not isinstance(r, dict) or system in ("model", "ratios", "loss_check"):
                continue
            if "tokens_per_s" not in r:
                print(f"{setting:<13}{system:<23}  {str(r.get('error', '?')).strip().splitlines()[-1][:70]}")
                continue
            print(f"{setting:<13}{system:<23}{r['tokens_per_s']:>10,.0f}{r['s_per_step']:>8.2f}"
                  f"{r['peak_mem_mb']:>11,.0f}{r['peak_rss_mb']:>10,.0f}{r['mfu']:>7.1%}{r['first_loss']:>12.6f}")
        if "ratios" in results:
            q = results["ratios"]
            print(f"{setting:<13}{'orpo / trl':<23}{q['tokens_per_s']:>9.2f}x{'':>8}{q['peak_mem']:>10.2f}x")


if __name__ == "__main__":
    sys.exit(main())
