"""SFT vs ORPO (and SimPO, DPO) from the same starting weights on real preference pairs, then a report.

    python examples/sft_vs_orpo/run.py                      # from the repository root; needs ../shared
    python examples/sft_vs_orpo/run.py --model org/name --data prefs.jsonl --runs sft orpo:0.1 orpo:1.0
    python examples/sft_vs_orpo/run.py train.max_steps=300  # any config key, for every run
    python examples/sft_vs_orpo/run.py --runs sft orpo:1.0 -- train.max_steps=300   # -- ends --runs

The ORPO paper's starting point (Hong et al. 2024, Fig. 3): plain SFT on the chosen responses
raises the log-probs of the rejected responses too; the odds-ratio term holds them down. Every
run here uses examples/sft_vs_orpo/config.yaml with the same seed (same weights, same batches, same
eval pairs); only the objective differs. The data is split once into OUT/data/train.jsonl and
OUT/data/heldout.jsonl (10%, seeded), so the held-out pairs are a file that ``orpo benchmark`` can
read too: after training, each run's final model and the starting model are benchmarked with
``orpo benchmark --pairs heldout.jsonl --tasks ifeval`` (the pairs as lm-eval two-choice questions,
and the 541 IFEval prompts offline). Runs go two at a time with one thread each (small models run
faster that way on 2 cores than one run with two threads). Each run's logs are OUT/logs/NAME.train.log
and OUT/logs/NAME.benchmark.log (outside the run folder, which orpo owns), the benchmark results
OUT/benchmarks/NAME.json; the report is OUT/report/report.html, its tables OUT/report/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = Path(os.environ.get("ORPO_SHARED", REPO.parent / "shared"))

# name -> the orpo.* overrides of that run; "orpo:L" is ORPO with λ = L
DEFAULT_RUNS = ["sft", "orpo:0.1", "orpo:1.0", "orpo:10", "simpo", "dpo"]
HELD_OUT = 0.1
# what `orpo benchmark` runs on every model: IFEval's 541 prompts, answers cut at this many tokens
BENCHMARK = ["--tasks", "ifeval", "--max-new-tokens", "48", "--batch-size", "32", "--chat-template", "none",
             "--max-length", "256", "--json"]


def run_overrides(spec: str) -> tuple[str, list[str]]:
    """``sft`` / ``orpo:0.5`` / ``simpo`` / ``cpo`` / ``dpo`` -> (run name, orpo.* overrides)."""
    objective, _, value = spec.partition(":")
    if objective == "orpo":
        lam = value or "0.1"
        return f"orpo-{lam}", ["orpo.objective=orpo", f"orpo.beta={lam}"]
    if value:
        key = {"simpo": "simpo_beta", "cpo": "cpo_beta", "dpo": "dpo_beta"}.get(objective)
        if key is None:
            raise SystemExit(f"run.py: '{spec}': only orpo, simpo, cpo and dpo take a value")
        return f"{objective}-{value}", [f"orpo.objective={objective}", f"orpo.{key}={value}"]
    return objective, [f"orpo.objective={objective}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "assets" / "stories260K" / "hf"), help="model folder or hub name")
    p.add_argument("--data", default=str(SHARED / "data" / "hh-rlhf" / "harmless-dev.jsonl.gz"),
                   help="preference data (any format orpo reads)")
    p.add_argument("--out", default="runs/sft_vs_orpo", help="folder for the runs and the report")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="SPEC",
                   help="sft | orpo:LAMBDA | simpo[:BETA] | cpo[:BETA] | dpo[:BETA] (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (default 2)")
    p.add_argument("--no-benchmark", action="store_true", help="skip orpo benchmark after training")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_file, heldout = split_data(args.data, out / "data")
    common = [f"model.name_or_path={args.model}", f"data.train={train_file}", f"data.eval={heldout}",
              "data.eval_fraction=0", *args.overrides]
    cli = [sys.executable, "-m", "orpo.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    # tokenize once, before the runs share the cache
    subprocess.run([*cli, "preprocess", str(HERE / "config.yaml"), *common], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    runs = [run_overrides(spec) for spec in args.runs]
    bench = [*cli, "benchmark", "--pairs", str(heldout), *BENCHMARK]
    # the starting model first: it runs beside the first training run
    jobs: list[tuple[str, list[list[str]]]] = [] if args.no_benchmark else [("step-0", [[*bench, args.model]])]
    for name, orpo in runs:
        train = [*cli, "train", str(HERE / "config.yaml"), *common, *orpo, f"train.output_dir={out / name}"]
        jobs.append((name, [train] + ([] if args.no_benchmark else [[*bench, str(out / name / "final")]])))
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    pending: list = list(jobs)
    running: list = []
    try:
        failed = _run_all(pending, running, out, env, args.jobs, started)
    finally:  # interrupted: stop the runs still going rather than leave them training unseen
        for _, proc, _, _ in running:
            proc.terminate()
    if failed:
        return 1

    from orpo.report import write_report

    names = [name for name, _ in runs]
    page = write_report([out / n for n in names], out / "report", names=names)
    table = markdown_table(json.loads((out / "report" / "summary.json").read_text()))
    if not args.no_benchmark:
        table += "\n\n" + benchmark_table(["step-0", *names], out / "benchmarks")
    (out / "report" / "table.md").write_text(table + "\n")
    print(table)
    print(f"report: {page}  ({time.perf_counter() - started:.0f} s in all)")
    return 0


def split_data(data: str, folder: Path) -> tuple[Path, Path]:
    """The rows of ``data`` (any format orpo reads) as train.jsonl and heldout.jsonl (HELD_OUT of them,
    drawn with a fixed seed); the files are the same on every run."""
    from orpo.data.sources import UnreadableRow, load_rows

    rows = [r for r in load_rows(data, "train").rows if not isinstance(r, UnreadableRow)]
    held = set(random.Random(0).sample(range(len(rows)), max(1, round(len(rows) * HELD_OUT))))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, keep in zip(paths, (False, True), strict=True):
        path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                for i, r in enumerate(rows) if (i in held) == keep))
    return paths


def _run_all(pending: list, running: list, out: Path, env: dict, jobs: int, started: float) -> list[str]:
    """Run the pending (name, commands) jobs, ``jobs`` at a time, each job's commands one after the other
    (stdout of `orpo benchmark --json` kept in OUT/benchmarks/NAME.json); the names that failed."""
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            name, commands = pending.pop(0)
            running.append(_start(name, commands, out, env, started))
        time.sleep(1.0)
        for item in list(running):
            name, proc, log, commands = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                print(f"[{time.perf_counter() - started:6.0f} s] {name} FAILED ({proc.returncode}), see {log.name}",
                      flush=True)
                failed.append(name)
            elif commands:
                running.append(_start(name, commands, out, env, started))
            else:
                print(f"[{time.perf_counter() - started:6.0f} s] {name} done", flush=True)
    return failed


def _start(name: str, commands: list[list[str]], out: Path, env: dict, started: float) -> tuple:
    """The first of ``commands`` started, its log in OUT/logs (orpo refuses a run folder holding files
    it did not write)."""
    command, rest = commands[0], commands[1:]
    what = "benchmark" if "benchmark" in command else "train"
    for folder in ("logs", "benchmarks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    log = (out / "logs" / f"{name}.{what}.log").open("w")
    stdout = (out / "benchmarks" / f"{name}.json").open("w") if what == "benchmark" else log
    print(f"[{time.perf_counter() - started:6.0f} s] {what} {name}", flush=True)
    proc = subprocess.Popen(command, stdout=stdout, stderr=log, env=env)
    if stdout is not log:
        stdout.close()
    return name, proc, log, rest


def markdown_table(summaries: list[dict]) -> str:
    """Final eval numbers per run: accuracy, margin, and the change of the log-probs since step 0."""
    lines = ["| run | objective | eval accuracy | margin | log odds ratio | Δ logp chosen | Δ logp rejected | NLL |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        f, c = s["final"], s["change"]
        lines.append(f"| {s['name']} | {s['objective']} | {f['accuracy']:.3f} | {f['margin']:+.4f} | "
                     f"{f['log_odds_ratio']:+.4f} | {c['logps_chosen']:+.3f} | {c['logps_rejected']:+.3f} | "
                     f"{f['nll_loss']:.3f} |")
    return "\n".join(lines)


BENCH_COLUMNS = [("pairs_acc_per_token", "held-out pairs: acc per token"), ("pairs_acc", "acc (summed)"),
                 ("ifeval_prompt_level_strict_acc", "IFEval prompt strict"),
                 ("ifeval_inst_level_strict_acc", "IFEval inst. strict"),
                 ("ifeval_prompt_level_loose_acc", "IFEval prompt loose"),
                 ("ifeval_inst_level_loose_acc", "IFEval inst. loose")]


def benchmark_table(names: list[str], folder: Path) -> str:
    """`orpo benchmark` per model: the held-out pairs as two-choice questions, and IFEval (± stderr)."""
    lines = ["| model | " + " | ".join(title for _, title in BENCH_COLUMNS) + " | seconds |",
             "|---|" + "---:|" * (len(BENCH_COLUMNS) + 1)]
    for name in names:
        row = json.loads((folder / f"{name}.json").read_text())[0]
        cells = [f"{row[k]:.3f}" + (f" ± {row[k + '_stderr']:.3f}" if k + "_stderr" in row else "")
                 for k, _ in BENCH_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
