"""Preference pairs from demonstrations alone (`orpo pairs`), then ORPO on them, against ORPO on the
human pairs and SFT on the demonstrations, all evaluated on the same held-out human pairs.

    python examples/pairs_then_orpo/run.py              # from the repository root; needs ../shared
    python examples/pairs_then_orpo/run.py --model org/name --data prefs.jsonl -- train.max_steps=300

The data is the 1,800 Anthropic HH "harmless" pairs, split as examples/sft_vs_orpo splits them
(the same 10% held out). From the training rows only the prompt and the chosen response are used
to build pairs: `orpo pairs --strategy reference-vs-sample` (SPIN-style) makes the human response
the chosen one and the model's own seeded sample the rejected one. Three runs from the same weights,
with the same config as examples/sft_vs_orpo (same seed, steps and learning rate):

- ``sft``: SFT on the demonstrations (the chosen responses);
- ``orpo-human``: ORPO on the human pairs (chosen vs the human-labelled rejected response);
- ``orpo-generated``: ORPO on the pairs `orpo pairs` built (chosen vs the model's own sample).

Each is evaluated on the held-out human pairs (the run's eval, then `orpo eval` in one table).
Outputs: OUT/data/generated.jsonl (the pairs, each traced to its source row and seed),
OUT/pairs.json (the summary and `orpo audit` of them), OUT/NAME (the runs), OUT/logs,
OUT/eval.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = Path(os.environ.get("ORPO_SHARED", REPO.parent / "shared"))
CONFIG = REPO / "examples" / "sft_vs_orpo" / "config.yaml"
LAMBDA = "1.0"


def _sibling():
    """examples/sft_vs_orpo/run.py, for its data split and its job runner (one copy of each)."""
    spec = importlib.util.spec_from_file_location("sft_vs_orpo_run", REPO / "examples" / "sft_vs_orpo" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "assets" / "stories260K" / "hf"), help="model folder or hub name")
    p.add_argument("--data", default=str(SHARED / "data" / "hh-rlhf" / "harmless-dev.jsonl.gz"),
                   help="preference data (any format orpo reads); only its prompts and chosen responses build pairs")
    p.add_argument("--out", default="runs/pairs_then_orpo", help="folder for the pairs, the runs and the table")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest sample (default: 64)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (default 2)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    args = p.parse_args()
    sibling = _sibling()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_file, heldout = sibling.split_data(args.data, out / "data")
    generated = out / "data" / "generated.jsonl"
    cli = [sys.executable, "-m", "orpo.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}

    # 1. pairs from the demonstrations: the chosen response against the model's own sample
    pairs = subprocess.run([*cli, "pairs", str(train_file), "--model", args.model, "--out", str(generated),
                            "--strategy", "reference-vs-sample", "--chat-template", "none", "--max-new-tokens",
                            str(args.max_new_tokens), "--seed", "0", "--json"],
                           check=True, env=env, stdout=subprocess.PIPE, text=True)
    summary = json.loads(pairs.stdout)
    (out / "pairs.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[{time.perf_counter() - started:6.0f} s] orpo pairs: {summary['kept']} pairs of {summary['rows']} rows "
          f"in {summary['seconds']:.0f} s, dropped {summary['dropped'] or 'none'}", flush=True)

    # 2. three runs from the same weights, evaluated on the held-out human pairs
    common = [f"model.name_or_path={args.model}", f"data.eval={heldout}", "data.eval_fraction=0", *args.overrides]
    runs = {"sft": [f"data.train={train_file}", "orpo.objective=sft"],
            "orpo-human": [f"data.train={train_file}", "orpo.objective=orpo", f"orpo.beta={LAMBDA}"],
            "orpo-generated": [f"data.train={generated}", "orpo.objective=orpo", f"orpo.beta={LAMBDA}"]}
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    jobs = [(name, [[*cli, "train", str(CONFIG), *common, *keys, f"train.output_dir={out / name}"]])
            for name, keys in runs.items()]
    running: list = []
    try:
        failed = sibling._run_all(jobs, running, out, env, args.jobs, started)
    finally:  # interrupted: stop the runs still going
        for _, proc, _, _ in running:
            proc.terminate()
    if failed:
        return 1

    # 3. one table: every final model and the starting one on the held-out human pairs
    models = [args.model, *[str(out / name / "final") for name in runs]]
    ev = subprocess.run([*cli, "eval", *[a for m in models for a in ("--model", m)], "--data", str(heldout), "--max-length", "256",
                         "--max-prompt-length", "128", "--chat-template", "none", "--json"],
                        check=True, env=env, stdout=subprocess.PIPE, text=True)
    rows = json.loads(ev.stdout)
    (out / "eval.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown_table(["step 0", *runs], rows, summary)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"{time.perf_counter() - started:.0f} s in all")
    return 0


def markdown_table(names: list[str], rows: list[dict], pairs: dict) -> str:
    lines = [f"Pairs built: {pairs['kept']} of {pairs['rows']} rows ({pairs['samples_generated']} samples, "
             f"{pairs['seconds']:.0f} s); chosen longer than rejected in {pairs['chosen_longer_share']:.1%}.", "",
             "| model | trained on | held-out accuracy | margin | logp chosen | logp rejected | NLL |",
             "|---|---|---:|---:|---:|---:|---:|"]
    trained = {"step 0": "", "sft": "demonstrations (SFT)", "orpo-human": f"human pairs (ORPO λ={LAMBDA})",
               "orpo-generated": f"generated pairs (ORPO λ={LAMBDA})"}
    for name, r in zip(names, rows, strict=True):
        lines.append(f"| {name} | {trained[name]} | {r['accuracy']:.3f} | {r['margin']:+.4f} | "
                     f"{r['logps_chosen']:.3f} | {r['logps_rejected']:.3f} | {r['nll']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
