"""``orpo pairs SOURCE --model M --out pairs.jsonl``: the command line of orpo.pairs.

Every check that needs no model comes first (flags, --out, every source row, the progress file's
arguments), then the generator and scorer load, then rows go a batch at a time: sampled, scored,
recorded in the progress file. The pairs are published to --out atomically at the end, the
progress file removed, and ``orpo audit`` runs on the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from orpo.pairs import STRATEGIES

EPILOG = """\
Sources: any file or hub dataset orpo reads: prompt/response, instruction(+input)/output, messages ending in an
assistant turn, preference rows (prompt + chosen; rejected ignored), or prompts alone (not for
reference-vs-sample). --verify ifeval needs IFEval rows (instruction_id_list, kwargs): another row is an error.
Each row's samples are seeded from (--seed, row, sample): a rerun, or a rerun after a kill (it goes on from
OUT.progress), writes the same file. Exit status 0 done, 2 bad input.
"""


def add_parser(sub: Any) -> None:
    from orpo.cli import _add_load_flags

    p = sub.add_parser("pairs", help="build preference pairs from demonstrations and a model's own samples",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="demonstrations: a file or hub dataset")
    p.add_argument("--model", required=True, help="the generator: model folder or hub name (with --generator-url: "
                   "the served model's name)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where the pairs go (standard format)")
    p.add_argument("--strategy", default="reference-vs-sample", choices=STRATEGIES)
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="samples per prompt for best-vs-worst (default 4); judge-pairwise uses 2")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--judge", default=None, help="judge model (local folder or hub name), for judge-pairwise")
    which.add_argument("--judge-url", default=None, help="OpenAI-compatible judge endpoint, for judge-pairwise")
    p.add_argument("--judge-model", default=None, metavar="NAME",
                   help="with --judge-url: the served model's name (default: the first the server lists)")
    which.add_argument("--reward-model", default=None, help="sequence-classification reward model, for best-vs-worst")
    which.add_argument("--verify", default=None, choices=("ifeval",), help="verifiable checks, for best-vs-worst")
    p.add_argument("--min-gap", type=float, default=0.0, help="best-vs-worst: drop pairs whose score gap is below it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (and per progress write)")
    p.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja")
    p.add_argument("--generator-url", default=None, help="generate through this OpenAI-compatible server (vLLM)")
    p.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--json", action="store_true", help="print the summary and the audit as one JSON object")
    _add_load_flags(p, "--model and the scorer", "the generator", "hub branch, tag or commit of --model")
    p.set_defaults(func=run_command)


def _check(args: argparse.Namespace) -> int:
    """The samples per prompt, after every flag is checked against the strategy."""
    from orpo.config import ConfigError

    if args.max_new_tokens < 1 or args.batch_size < 1 or not 0 < args.top_p <= 1 or args.temperature < 0:
        raise ConfigError("--max-new-tokens and --batch-size must be at least 1, --top-p in (0, 1], "
                          "--temperature at least 0")
    scorer = args.reward_model or args.verify
    if args.strategy == "best-vs-worst" and not scorer:
        raise ConfigError("--strategy best-vs-worst needs a scorer: --reward-model RM or --verify ifeval")
    if args.strategy == "judge-pairwise" and not (args.judge or args.judge_url):
        raise ConfigError("--strategy judge-pairwise needs --judge JUDGE or --judge-url URL")
    if args.strategy != "judge-pairwise" and (args.judge or args.judge_url):
        raise ConfigError("--judge / --judge-url are for --strategy judge-pairwise")
    if args.judge_model is not None and args.judge_url is None:
        raise ConfigError("--judge-model names a served model: it is for --judge-url")
    if args.strategy == "judge-pairwise" and args.samples not in (None, 2):
        raise ConfigError("--strategy judge-pairwise compares two samples: --samples 2 (or leave it out)")
    if args.strategy == "reference-vs-sample" and args.samples not in (None, 1):
        raise ConfigError("--strategy reference-vs-sample takes one sample per prompt: leave --samples out")
    k = {"reference-vs-sample": 1, "judge-pairwise": 2}.get(args.strategy, args.samples or 4)
    if k < 2 and args.strategy == "best-vs-worst":
        raise ConfigError("--samples must be at least 2 for best-vs-worst")
    if args.strategy != "judge-pairwise" and k > 1 and args.temperature <= 0:
        raise ConfigError("--temperature 0 gives one greedy sample K times: set --temperature above 0")
    return k


def run_command(args: argparse.Namespace) -> int:
    from orpo.disk import output_file, write_atomic
    from orpo.pairs.build import Plan, run_batch, summarize
    from orpo.pairs.demos import read_demos
    from orpo.pairs.progress import Progress
    from orpo.pairs.sampling import SampleSpec

    started = time.perf_counter()
    k = _check(args)
    # a file orpo pairs wrote: its rows carry their trace
    out = output_file(args.out, "--out", lambda row: {"strategy", "generator", "source"} <= row.keys())
    demos = read_demos(args.source, args.split, need_response=args.strategy == "reference-vs-sample",
                       need_ifeval=args.verify == "ifeval")
    spec = SampleSpec(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    # what decides the pairs: a resumed run must have the same
    arguments = {"SOURCE": args.source, "source rows": demos.fingerprint(), "--split": args.split,
                 "--model": args.model, "--strategy": args.strategy, "--samples": k, "--seed": args.seed,
                 "--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature, "--top-p": args.top_p,
                 "--min-gap": args.min_gap, "--chat-template": args.chat_template,
                 "--generator-url": args.generator_url, "--judge": args.judge, "--judge-url": args.judge_url,
                 "--judge-model": args.judge_model, "--reward-model": args.reward_model, "--verify": args.verify,
                 "--revision": args.revision, "--dtype": args.dtype}
    progress = Progress(out, arguments)
    resumed = sum(1 for d in demos.rows if d.index in progress.done)
    plan = Plan(strategy=args.strategy, samples=k, seed=args.seed, spec=spec, min_gap=args.min_gap,
                source=demos.name, generator=_generator(args), scorer=_scorer(args), judge=_judge(args))
    todo = [d for d in demos.rows if d.index not in progress.done]
    generated = 0
    for start in range(0, len(todo), args.batch_size):
        entries = run_batch(plan, todo[start:start + args.batch_size])
        generated += sum(e["generations"] for e in entries)
        progress.add(entries)
        print(f"orpo pairs: {len(progress.done)}/{len(demos.rows)} rows", file=sys.stderr, flush=True)
    truncated = getattr(plan.generator, "truncated", 0)
    if truncated:
        print(f"orpo pairs: {truncated} prompts longer than the model's positions were cut "
              "from the left", file=sys.stderr)
    entries = [progress.done[d.index] for d in demos.rows]
    lines = "".join(json.dumps(e["pair"], ensure_ascii=False) + "\n" for e in entries if e.get("dropped") is None)
    write_atomic(out, lines.encode("utf-8"))
    progress.remove()
    summary = summarize(entries, resumed=resumed, generated=generated, out=str(args.out), skipped=demos.skipped)
    summary.seconds = time.perf_counter() - started
    report = _audit(str(out)) if summary.kept else None
    if args.json:
        summary.audit = report.to_json() if report is not None else None
        print(json.dumps(summary.to_json(), ensure_ascii=False))
    else:
        print(summary.render())
        if report is not None:
            print(report.render())
    return 0


def _generator(args: argparse.Namespace) -> Any:
    from orpo.pairs.sampling import EndpointGenerator, LocalGenerator

    if args.generator_url:
        return EndpointGenerator(args.generator_url, args.model, chat=args.chat_template != "none",
                                 concurrency=min(args.batch_size, 8))
    return LocalGenerator(args.model, chat_template=args.chat_template, batch_size=args.batch_size,
                          dtype=args.dtype, trust_remote_code=args.trust_remote_code, revision=args.revision)


def _scorer(args: argparse.Namespace) -> Any:
    from orpo.pairs.scorers import IfevalChecks, RewardModel

    if args.reward_model:
        return RewardModel(args.reward_model, trust_remote_code=args.trust_remote_code)
    if args.verify == "ifeval":
        return IfevalChecks()
    return None


def _judge(args: argparse.Namespace) -> Any:
    if not (args.judge or args.judge_url):
        return None
    from orpo.judge import build_judge

    return build_judge(args.judge, args.judge_url, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       model=args.judge_model)


def _audit(path: str) -> Any:
    from orpo.data.audit import audit

    return audit(path)
