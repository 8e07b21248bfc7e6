"""SFT vs ORPO (and SimPO, DPO) from the same starting weights on real preference pairs, then a report.

    python examples/sft_vs_orpo/run.py                      # from the repository root; needs ../shared
    python examples/sft_vs_orpo/run.py --model org/name --data prefs.jsonl --runs sft orpo:0.1 orpo:1.0
    python examples/sft_vs_orpo/run.py train.max_steps=300  # any config key, for every run

The ORPO paper's starting point (Hong et al. 2024, Fig. 3): plain SFT on the chosen responses
raises the log-probs of the rejected responses too; the odds-ratio term holds them down. Every
run here uses examples/sft_vs_orpo/config.yaml with the same seed (same weights, same batches, same
eval pairs); only the objective differs. Runs go two at a time with one thread each (small models
run faster that way on 2 cores than one run with two threads). Each run's log is
OUT/NAME/train.log; the report is OUT/report/report.html, its table OUT/report/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = Path(os.environ.get("ORPO_SHARED", REPO.parent / "shared"))

# name -> the orpo.* overrides of that run; "orpo:L" is ORPO with λ = L
DEFAULT_RUNS = ["sft", "orpo:0.1", "orpo:1.0", "orpo:10", "simpo", "dpo"]


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
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"model.name_or_path={args.model}", f"data.train={args.data}", *args.overrides]
    cli = [sys.executable, "-m", "orpo.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    # tokenize once, before the runs share the cache
    subprocess.run([*cli, "preprocess", str(HERE / "config.yaml"), *common], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    jobs = [run_overrides(spec) for spec in args.runs]
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    pending: list = list(jobs)
    running: list = []
    try:
        failed = _run_all(pending, running, cli, common, out, env, args.jobs, started)
    finally:  # interrupted: stop the runs still going rather than leave them training unseen
        for _, proc, _ in running:
            proc.terminate()
    if failed:
        return 1

    from orpo.report import write_report

    names = [name for name, _ in jobs]
    page = write_report([out / n for n in names], out / "report", names=names)
    table = markdown_table(json.loads((out / "report" / "summary.json").read_text()))
    (out / "report" / "table.md").write_text(table + "\n")
    print(table)
    print(f"report: {page}  ({time.perf_counter() - started:.0f} s in all)")
    return 0


def _run_all(pending: list, running: list, cli: list[str], common: list[str], out: Path, env: dict, jobs: int,
             started: float) -> list[str]:
    """Run the pending (name, overrides) jobs, ``jobs`` at a time; the names of those that failed."""
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            name, orpo = pending.pop(0)
            (out / name).mkdir(parents=True, exist_ok=True)
            log = (out / name / "train.log").open("w")
            cmd = [*cli, "train", str(HERE / "config.yaml"), *common, *orpo, f"train.output_dir={out / name}"]
            print(f"[{time.perf_counter() - started:6.0f} s] start {name}: {' '.join(orpo)}", flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1.0)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {out / name / 'train.log'}"
                print(f"[{time.perf_counter() - started:6.0f} s] {name} {status}", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    return failed


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


if __name__ == "__main__":
    sys.exit(main())
