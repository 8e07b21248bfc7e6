"""``orpo benchmark MODEL [MODEL ...] --tasks T1,T2``: lm-eval tasks on each model, one table.

Everything that needs no model is checked first (lm-eval installed, flags, every task name, the
--pairs file, the --out folder), so a mistake exits 2 before any model loads and writes nothing.
Each model is loaded as ``orpo eval`` loads it and prompted with ``--chat-template`` as training
renders it. ``--out DIR``: lm-eval's results JSON per model and ``benchmark.json`` (every row),
published together when every model is done.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from typing import Any

EPILOG = """\
Tasks: any lm-eval task, group or tag (hub data for most), orpo's offline `ifeval` (the 541 IFEval prompts
shipped with orpo, scored by lm-eval's own checks; it replaces lm-eval's `ifeval`, which reads the hub), and
the tasks in --include-path (YAMLs; they replace tasks of the same name). --pairs FILE adds the task `pairs`:
chosen vs rejected of a preference file as lm-eval multiple choice; its acc_per_token is `orpo eval`'s accuracy.
Each cell: the value ± lm-eval's standard error. Exit status 0 done, 2 bad input (before any model loads).
"""


def add_parser(sub: Any) -> None:
    from orpo.cli import LOAD_REVISION_HELP, _add_load_flags

    p = sub.add_parser("benchmark", help="lm-evaluation-harness tasks (IFEval offline, --pairs) on models, one table",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folder (a final/ or checkpoint) or hub name")
    p.add_argument("--tasks", default=None, metavar="T1,T2", help="lm-eval task names, comma-separated")
    p.add_argument("--pairs", default=None, metavar="FILE", help="a preference file (any format orpo reads) as the "
                   "two-choice task `pairs`")
    p.add_argument("--limit", default=None, type=_limit, metavar="N",
                   help="the first N examples of each task (a fraction when below 1); for quick checks")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of lm-eval task YAMLs")
    p.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja (default: the "
                   "tokenizer's own, else none)")
    p.add_argument("--max-length", type=int, default=None, help="token limit of a request (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens (default: each task's "
                   "own; ifeval 1280)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("--out", default=None, metavar="DIR", help="write lm-eval's results JSON per model and "
                   "benchmark.json here")
    _add_load_flags(p, "each MODEL", "the weights", LOAD_REVISION_HELP)
    p.set_defaults(func=run_command)


def _limit(text: str) -> int | float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--limit must be above 0, not {text}")
    return value if value < 1 else int(value)


def run_command(args: argparse.Namespace) -> int:
    from orpo import disk
    from orpo.config import ConfigError
    from orpo.harness import PairsTask, resolve_tasks, run_tasks
    from orpo.harness.runner import require_lm_eval
    from orpo.train.evaluate import load_for_inference

    require_lm_eval()
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1) or (
            args.max_length is not None and args.max_length < 2):
        raise ConfigError("--batch-size and --max-new-tokens must be at least 1, --max-length at least 2")
    if not args.tasks and not args.pairs:
        raise ConfigError("nothing to run: give --tasks T1,T2 and/or --pairs FILE")
    names = resolve_tasks(args.tasks.split(","), args.include_path) if args.tasks else []
    pairs = PairsTask.read(args.pairs) if args.pairs else None
    out = disk.expand(args.out) if args.out else None
    if out is not None:
        disk.inspect_folder(out, "benchmark", "orpo benchmark --out")
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)

    rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    raws: list[dict[str, Any]] = []
    for name in args.models:
        model, tokenizer = load_for_inference(name, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                              revision=args.revision, flags=True)
        run = run_tasks(model, tokenizer, [*names, *([pairs] if pairs else [])], chat_template=args.chat_template,
                        limit=args.limit, include_path=args.include_path, batch_size=args.batch_size,
                        max_length=args.max_length, max_new_tokens=args.max_new_tokens, seed=1234)
        del model
        gc.collect()
        for note in pairs.notes if pairs else []:
            print(f"{name}: {note}", file=sys.stderr)
        print(f"{name}: {run.seconds:.1f} s", file=sys.stderr)
        rows.append({"model": name, **run.flat(), "seconds": round(run.seconds, 3)})
        cells.append(_cells(name, run))
        raws.append(run.raw)

    if out is not None:
        _write(out, args, rows, raws)
    if args.json:
        print(json.dumps(rows))
    else:
        from orpo.train.evaluate import print_eval_table

        columns = list(dict.fromkeys(k for c in cells for k in c))
        print_eval_table([{k: c.get(k, "") for k in columns} for c in cells],
                         title=f"lm-eval benchmarks ({', '.join([*names, *(['pairs'] if pairs else [])])})")
    return 0


def _cells(name: str, run) -> dict[str, str]:
    from orpo.harness.results import column, shown

    return {"model": name, **{column(s): shown(s) for s in run.scores}}


def _write(out, args: argparse.Namespace, rows: list[dict[str, Any]], raws: list[dict[str, Any]]) -> None:
    """Every file at once (``publish_owned``): the folder is never half of one run and half of another."""
    from orpo import disk
    from orpo.harness.results import file_name

    taken: set[str] = set()
    files = [file_name(m, taken) for m in args.models]
    summary = {"tasks": args.tasks.split(",") if args.tasks else [], "pairs": args.pairs, "limit": args.limit,
               "chat_template": args.chat_template, "max_new_tokens": args.max_new_tokens,
               "max_length": args.max_length, "files": dict(zip(args.models, files, strict=True)), "rows": rows}
    with disk.publish_owned(out, "benchmark", "orpo benchmark --out") as tmp:
        for file, raw in zip(files, raws, strict=True):
            disk.write_atomic(tmp / file, json.dumps(raw, indent=2, ensure_ascii=False).encode("utf-8"))
        disk.write_atomic(tmp / "benchmark.json", json.dumps(summary, indent=2).encode("utf-8"))
