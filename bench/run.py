"""Benchmark ORPO training steps: non-pad tokens/s, s/step, peak memory; see bench/README.md.

The setting of the TRL number in shared/notes/anchors.md: a fresh fp32 Llama (hidden 256, 4 layers,
vocab 8192 from a BPE trained on the HH text, cached in runs/bench/), 8 pairs per step, the HH
harmless pairs that fit max_length 512 untruncated. Each configuration runs in its own process, so
peak RSS does not mix; orpo and trl are imported inside functions because the TRL child runs this
file with another venv's python.
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
# name -> logits_to_keep: the LM head only where the loss reads a log-prob (orpo's default), or at every
CONFIGS = {"orpo": True, "orpo-full-logits": False}  # position, all [2B, T, V] logits, as TRL does


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--steps", type=int, default=8, help="measured optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence; longer pairs are left out")
    for flag, default in (("--hidden-size", 256), ("--layers", 4), ("--heads", 4)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--intermediate-size", type=int, default=688, help="688 = 8/3 x 256 rounded up to 16")
    p.add_argument("--vocab", type=int, default=8192, help="size of the BPE trained on the HH text")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--trl-python", help="python of a venv with trl: also run TRL's ORPOTrainer")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.warmup < 1 or args.steps < 1 or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error("--warmup and --steps must be at least 1, and --device cuda needs a visible CUDA device")
    return args


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


def llama(args: argparse.Namespace) -> dict:
    """The model both trainers build (untied LM head, as Llama; the vocabulary comes from the tokenizer)."""
    return {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
            "max_position_embeddings": max(2048, args.max_length), "tie_word_embeddings": False}


def orpo_config(args: argparse.Namespace, name: str):
    from orpo.config import load_config

    return load_config(raw={
        "model": {"init": {"arch": "llama", **llama(args)}, "tokenizer": str(args.out / f"tokenizer-{args.vocab}"),
                  "dtype": "float32", "chat_template": "none"},
        # Tokenized untruncated (a limit no pair reaches); FitData then keeps the pairs that fit max_length.
        "data": {"train": str(HH), "max_length": 1 << 20, "cache_dir": str(args.out / "data-cache")},
        "orpo": {"beta": 0.1},
        "train": {"output_dir": str(args.out / name), "overwrite": True, "max_steps": args.warmup + args.steps,
                  "batch_size": args.batch_size, "learning_rate": 8e-6, "log_every": 1, "save_final": False,
                  "seed": 42},
    })


class FitData:
    """The prepared HH pairs whose chosen and rejected sequences both fit in ``max_length``."""

    def __init__(self, args: argparse.Namespace, cfg, tokenizer):
        import pyarrow.compute as pc

        from orpo.data.pipeline import prepare_data

        data = prepare_data(cfg.data, tokenizer, chat_template="none", seed=cfg.train.seed)
        longest = pc.max_element_wise(*(pc.list_value_length(data.train.data.column(f"{s}_input_ids"))
                                        for s in ("chosen", "rejected")))
        self.keep = [i for i, n in enumerate(longest.to_pylist()) if n <= args.max_length]
        self.train, self.eval, self.total = data.train.select(self.keep), None, len(data.train)
        self.fingerprint = f"{data.fingerprint}-fit{args.max_length}"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(marks: list[tuple[float, int]], warmup: int) -> dict:
    """Wall-clock rates between the ends of step ``warmup`` and the last step (same for orpo and TRL)."""
    (t0, n0), (t1, n1), steps = marks[warmup - 1], marks[-1], len(marks) - warmup
    return {"steps_measured": steps, "s_per_step": (t1 - t0) / steps, "tokens_per_s": (n1 - n0) / (t1 - t0),
            "tokens_per_step": (n1 - n0) / steps}


def run_orpo(args: argparse.Namespace, name: str) -> dict:
    """One orpo configuration through the public Trainer; per-step marks from ``on_step_end``."""
    from orpo.train import Trainer, load_tokenizer

    cfg = orpo_config(args, name)
    data = FitData(args, cfg, load_tokenizer(cfg.model))
    marks, secs = [], []  # secs: the trainer's own clock, optimizer steps only (no data loading, no logging)
    trainer = Trainer(cfg, data=data, progress=False, on_step_end=lambda tr: (
        marks.append((time.perf_counter(), tr.state.tokens_seen)), secs.append(tr.state.train_seconds))).setup()
    if not CONFIGS[name]:
        trainer.keep_mode = None  # no logits_to_keep: the model computes all [2B, T, V] logits
    rss_setup = peak_rss()
    result = trainer.train()
    out = measure(marks, args.warmup)
    w = args.warmup
    out.update(trainer_tokens_per_s=(marks[-1][1] - marks[w - 1][1]) / (secs[-1] - secs[w - 1]),
               params=sum(p.numel() for p in trainer.model.parameters()), pairs=len(data.train),
               pairs_total=data.total, peak_rss_setup=rss_setup, last_loss=result.last_metrics.get("loss"))
    return out


def run_trl(args: argparse.Namespace) -> dict:
    """TRL's ORPOTrainer on the same tokenizer, pairs, model and seed (run with a trl venv's python)."""
    import datasets
    import torch
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(args.out / f"tokenizer-{args.vocab}")
    # the pairs orpo trains on, as prompt/chosen/rejected text (the parent wrote them)
    ds = datasets.load_dataset("json", data_files=str(args.out / "fit.jsonl"), split="train")
    mcfg = AutoConfig.for_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **llama(args))
    torch.manual_seed(42)  # as orpo's build_model: the same initial weights
    model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)
    tcfg = ORPOConfig(output_dir=str(args.out / "trl"), per_device_train_batch_size=args.batch_size,
                      max_length=args.max_length, beta=0.1, learning_rate=8e-6, max_steps=args.warmup + args.steps,
                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                      dataloader_num_workers=0, seed=42, bf16=False)  # TRL defaults to bf16: measure fp32
    trainer = ORPOTrainer(model=model, args=tcfg, train_dataset=ds, processing_class=tok)
    counts: list[int] = []  # non-pad tokens of each collated batch, in order (the loader may read ahead)

    def counting(rows, collate=trainer.data_collator):
        batch = collate(rows)
        counts.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
        return batch

    trainer.data_collator, marks = counting, []

    class Mark(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            marks.append((time.perf_counter(), sum(counts[: len(marks) + 1])))

    trainer.add_callback(Mark())
    rss_setup = peak_rss()
    trainer.train()
    out = measure(marks, args.warmup)
    out.update(params=sum(p.numel() for p in model.parameters()), pairs=len(ds), peak_rss_setup=rss_setup,
               trl=trl.__version__)
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    out = run_trl(args) if args.child == "trl" else run_orpo(args, args.child)
    out.update(config=args.child, peak_rss=peak_rss(), torch=torch.__version__, threads=torch.get_num_threads())
    if torch.cuda.is_available():
        out.update(peak_cuda_bytes=torch.cuda.max_memory_allocated(), gpu=torch.cuda.get_device_name())
    print("BENCH " + json.dumps(out))


def prepare(args: argparse.Namespace) -> None:
    """Tokenizer and tokenized data once, so children only read caches; fit.jsonl: the pairs used, as text."""
    from orpo.data.formats import normalize
    from orpo.data.sources import load_rows
    from orpo.train import load_tokenizer

    pairs = normalize(load_rows(str(HH)), on_bad_row="skip").pairs  # the order prepare_data keeps them in
    tok_dir = args.out / f"tokenizer-{args.vocab}"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir, args.vocab, [p.prompt + r for p in pairs for r in (p.chosen, p.rejected)])
    cfg = orpo_config(args, "orpo")
    data = FitData(args, cfg, load_tokenizer(cfg.model))
    assert data.total == len(pairs), "prepare_data dropped other pairs than normalize()"
    with (args.out / "fit.jsonl").open("w") as f:
        f.writelines(json.dumps({"prompt": pairs[i].prompt, "chosen": pairs[i].chosen,
                                 "rejected": pairs[i].rejected}) + "\n" for i in data.keep)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
    runs = [(sys.executable, c) for c in args.configs] + ([(args.trl_python, "trl")] if args.trl_python else [])
    results = []
    for python, name in runs:  # one at a time: the machine's cores are the thing measured
        load = os.getloadavg()[0]
        proc = subprocess.run([python, __file__, *base, "--device", args.device, "--child", name], env=env,
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append({**json.loads(line[6:]), "loadavg_1min_before": load})
    report(args, results)


def report(args: argparse.Namespace, results: list[dict]) -> None:
    r0 = results[0]
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": r0["torch"], "device": args.device, "gpu": r0.get("gpu")}
    setting = {k: v for k, v in vars(args).items() if k != "child"}
    print(f"{r0['params']:,} params, {r0['pairs']} of {r0.get('pairs_total', '?')} HH pairs fit in "
          f"{args.max_length} tokens; {args.steps} steps measured after {args.warmup} warm-up; "
          f"{machine['cpu_count']} CPUs, torch {machine['torch']}, {args.device}")
    print(f"{'config':<18}{'tokens/s':>10}{'s/step':>9}{'tok/step':>10}{'peak RSS':>11}{'peak CUDA':>11}")
    for r in results:
        cuda = f"{r['peak_cuda_bytes'] / 2**30:.2f} GiB" if "peak_cuda_bytes" in r else "-"
        print(f"{r['config']:<18}{r['tokens_per_s']:>10,.0f}{r['s_per_step']:>9.2f}{r['tokens_per_step']:>10,.0f}"
              f"{r['peak_rss'] / 2**30:>7.2f} GiB{cuda:>11}")
    path = args.out / f"bench-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine, "setting": setting, "results": results}, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
