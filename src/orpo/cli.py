"""The `orpo` command line: train, sweep, preprocess, audit, eval, generate, merge, checkpoints, report,
push, benchmark, config-doc.

Every command reports an expected failure (bad configuration or data, a diverged run) as one clear
message on stderr and its own exit status (``EXIT_*`` below), without a traceback; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence

EXIT_FAILED_RUNS = 1  # `orpo sweep`: some runs failed (they are in the table)
EXIT_USAGE = 2  # bad input: configuration, data or arguments
EXIT_DIVERGED = 3  # training stopped: train.max_bad_steps non-finite steps in a row (TrainingDiverged)
EXIT_STOPPED = 4  # stopped before the last step when asked (SIGTERM, SIGINT), after a checkpoint: resume to go on
EXIT_SAVE_FAILED = 5  # a checkpoint, the model or another output could not be written (disk full, I/O error)
EXIT_PUSH_FAILED = 6  # the hub refused or failed an upload (`orpo push`, train.push_to_hub): nothing was committed

EXIT_EPILOG = f"""\
exit status: 0 success, {EXIT_USAGE} bad configuration or data, {EXIT_DIVERGED} training diverged (non-finite
steps; the message names the checkpoint to resume from), {EXIT_STOPPED} stopped by SIGTERM or SIGINT after the
current step and a checkpoint (resume with train.resume=auto), {EXIT_SAVE_FAILED} a checkpoint, the model or another
output could not be written (disk full, I/O error; the message names the path and the space), {EXIT_PUSH_FAILED} a
push to the hub failed (nothing committed; the local folders unchanged), 130 interrupted (a second Ctrl-C).
"""

TRAIN_EPILOG = """\
CONFIG is a YAML file with sections model, data, orpo, train; any key can be overridden with
key.path=value (parsed as YAML), e.g.  orpo train cfg.yaml train.max_steps=100 orpo.beta=0.2
Every key, its default and its meaning: docs/configuration.md (or `orpo config-doc`).
"""


AUDIT_EPILOG = """\
Checks (counts are rows; examples are row numbers: the file line for .jsonl, the 1-based row
otherwise): duplicates, identical_pairs, conflicting_pairs (same prompt, chosen and rejected
swapped), near_identical_pairs (< 5% of characters differ), empty_responses, template_leaks,
control_chars; chosen_longer_share and mean lengths; with --model: truncated_share,
dropped_by_truncation, the model's accuracy and the 20 pairs it prefers the rejected response of
most strongly; with --eval: eval_prompt_overlap. Exit status 0 whatever it finds, 2 on bad input.
"""


def main(argv: Sequence[str] | None = None) -> int:
    # Here, not under __main__: the installed `orpo` command calls main() directly. Without it a
    # tokenizer used before a fork (DataLoader workers, datasets.map) prints the tokenizers warning.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from transformers.utils import logging as hf_logging

    from orpo.config import ConfigError
    from orpo.data import DataError
    from orpo.disk import SaveFailed
    from orpo.hub import PushFailed
    from orpo.train.trainer import TrainingStopped

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own progress is enough

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError) as e:
        if args.verbose or os.environ.get("ORPO_DEBUG", "") not in ("", "0"):
            traceback.print_exception(e)
        print(f"orpo {args.command}: error{_rank_tag()}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as e:
        _say_once(f"orpo {args.command}: {e}")
        return EXIT_STOPPED
    except SaveFailed as e:
        _say_once(f"orpo {args.command}: error: {e}")
        return EXIT_SAVE_FAILED
    except PushFailed as e:
        print(f"orpo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_PUSH_FAILED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"orpo {args.command}: error{_rank_tag()}: the disk is full ({e}): free some space and run it again"
              + (" (train.resume=auto goes on from the newest checkpoint)" if args.command == "train" else ""),
              file=sys.stderr)
        return EXIT_SAVE_FAILED
    except KeyboardInterrupt:
        print(f"orpo {args.command}: interrupted", file=sys.stderr)
        return 130


def _say_once(message: str) -> None:
    """A failure every process of a run reports alike (they agreed on it): printed by rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def _rank_tag() -> str:
    """Under torchrun / accelerate launch, which process failed (the launcher then stops the others)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orpo", description="ORPO preference training for causal language models.",
                                epilog=EXIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="with a one-line error, print the traceback behind it first (also ORPO_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train from a YAML config", epilog=TRAIN_EPILOG + "\n" + EXIT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="YAML configuration file")
    t.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides")
    t.set_defaults(func=_cmd_train)

    sw = sub.add_parser(
        "sweep", help="train a grid of configs (key=v1,v2,...) and tabulate their eval metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each key=v1,v2,... is swept (commas inside [...] or quotes do not split); key=value is fixed.\n"
        "Runs go one after another into OUTPUT_DIR/<values>/; the table (OUTPUT_DIR/sweep/sweep.md and\n"
        "sweep.json) is rewritten after each run, and printed at the end. Exit status 1 if a run failed.\n"
        "  orpo sweep cfg.yaml orpo.beta=0.05,0.1,0.2 train.learning_rate=5e-6,8e-6 train.max_steps=500")
    sw.add_argument("config", help="YAML configuration file")
    sw.add_argument("overrides", nargs="+", metavar="key.path=v1,v2,...", help="swept keys and fixed overrides")
    sw.add_argument("--sort", default="eval_loss", metavar="METRIC",
                    help="eval metric the table is sorted by, best final value first (default: eval_loss)")
    sw.add_argument("--metrics", default=None, metavar="M1,M2",
                    help="eval metrics in the table (default: the sort metric, loss, accuracy, log odds ratio / "
                    "margin, general ppl: those the runs have)")
    sw.add_argument("--stop-on-failure", action="store_true", help="stop the sweep at the first failed run")
    sw.add_argument("--dry-run", action="store_true", help="validate every config and list the runs; train nothing")
    sw.set_defaults(func=_cmd_sweep)

    pp = sub.add_parser("preprocess", help="tokenize the data and print its summary, nothing else",
                        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pp.add_argument("config")
    pp.add_argument("overrides", nargs="*", metavar="key.path=value")
    pp.set_defaults(func=_cmd_preprocess)

    a = sub.add_parser("audit", help="find faults in preference data (duplicates, swapped labels, leaks, ...)",
                       epilog=AUDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("data", help="preference data file or hub dataset (read as `orpo train` reads it)")
    a.add_argument("--format", default="auto", help="auto | standard | implicit | conversational | sharegpt")
    a.add_argument("--columns", nargs=3, metavar=("PROMPT", "CHOSEN", "REJECTED"), default=None,
                   help="column names of prompt, chosen and rejected (implies format columns)")
    a.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    a.add_argument("--model", default=None, help="model folder or hub name: token lengths, truncation, and its "
                   "accuracy and label-noise candidates")
    a.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja")
    a.add_argument("--max-length", type=int, default=None, help="token limit per sequence (needs --model; "
                   "default: data.max_length's default)")
    a.add_argument("--max-prompt-length", type=int, default=None, help="as data.max_prompt_length (needs --model)")
    a.add_argument("--min-response-tokens", type=int, default=None, help="as data.min_response_tokens (needs --model)")
    a.add_argument("--eval", default=None, help="eval data: reports eval prompts also present in DATA")
    a.add_argument("--batch-size", type=int, default=8, help="pairs per forward when scoring with --model")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    a.set_defaults(func=_cmd_audit)

    e = sub.add_parser("eval", help="ORPO metrics of one or several models on preference pairs (one table)")
    e.add_argument("--model", required=True, action="append",
                   help="model folder (a final/ or checkpoint) or hub name; repeat to compare models")
    e.add_argument("--json", action="store_true", help="print a JSON list (one object per model) instead of the table")
    e.add_argument("--data", required=True, help="preference data file or hub dataset")
    e.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    e.add_argument("--format", default="auto", help="auto | standard | implicit | conversational | sharegpt")
    e.add_argument("--max-length", type=int, default=1024)
    e.add_argument("--max-prompt-length", type=int, default=None)
    e.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--layout", default="auto", help="auto | padded | packed | shared_prompt | packed_shared_prompt: "
                   "how pairs are batched, as data.layout in training (default: auto, the fastest exact one)")
    e.add_argument("--beta", type=float, default=0.1, help="λ used for the reported loss")
    e.add_argument("--max-samples", type=int, default=None)
    _add_load_flags(e, "each --model", "the weights", LOAD_REVISION_HELP)
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="generate replies to one prompt or a file of them (chat template applied)")
    g.add_argument("--model", required=True)
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one prompt; the reply is printed")
    which.add_argument("--prompts", metavar="FILE", help="a file (or hub dataset) of prompts: 'prompt', 'messages' "
                       "or 'instruction' rows; one JSON line per reply, in the file's order")
    g.add_argument("--out", metavar="FILE.jsonl", help="with --prompts: write the replies here (default: stdout)")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=16, help="prompts per batch (left-padded)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _add_load_flags(g, "--model", "the weights", LOAD_REVISION_HELP)
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    m.add_argument("adapter", help="adapter folder (e.g. OUTPUT_DIR/final)")
    m.add_argument("output", help="where to write the merged model")
    _add_load_flags(m, "the base model", "the base, and of the merged model written",
                    "hub branch, tag or commit of the base model (default: the one adapter_config.json names, "
                    "else main)")
    m.set_defaults(func=_cmd_merge)

    k = sub.add_parser("checkpoints", help="list a run's checkpoints: complete, incomplete or damaged")
    k.add_argument("output_dir", help="the run's train.output_dir")
    k.add_argument("--no-checksums", action="store_true", help="check sizes only (fast for large checkpoints)")
    k.set_defaults(func=_cmd_checkpoints)
    r = sub.add_parser("report", help="plots and one self-contained HTML page of one or several runs")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.output_dir of a run (several are overlaid)")
    r.add_argument("--out", required=True, help="folder for report.html, the PNG figures and summary.json")
    r.add_argument("--name", action="append", default=None,
                   help="a name per run, in order (default: the folder names)")
    r.set_defaults(func=_cmd_report)

    hp = sub.add_parser("push", help="upload a finished model folder (RUN_DIR/final) to the Hugging Face Hub",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="Sends the weights, configs, tokenizer and model card (README.md, its metadata read by "
                        "the hub) in one commit;\nnever orpo's .orpo.json / .orpo.lock, hidden files or training "
                        "state. The token: HF_TOKEN or `hf auth login`.\nExit status 0 pushed, 2 bad input (nothing "
                        f"sent), {EXIT_PUSH_FAILED} the upload failed (nothing committed).")
    hp.add_argument("folder", help="a finished model folder orpo wrote: RUN_DIR/final, RUN_DIR/best or `orpo merge` OUT")
    hp.add_argument("--repo", required=True, help="hub repo ORG/NAME (created if it does not exist)")
    hp.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                    "visibility)")
    hp.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created from main if new)")
    hp.add_argument("--message", default=None, help="commit message (default: orpo push FOLDER)")
    hp.set_defaults(func=_cmd_push)

    _register("orpo.harness.command", sub)
    _register("orpo.compare", sub)
    _register("orpo.pairs.command", sub)
    c = sub.add_parser("config-doc", help="print the configuration reference (Markdown)")
    c.set_defaults(func=_cmd_config_doc)
    return p


def _register(name: str, sub) -> None:
    """A command whose parser and function live in their own module (``add_parser(sub)``)."""
    importlib.import_module(name).add_parser(sub)


LOAD_REVISION_HELP = ("hub branch, tag or commit of a hub --model, or of a LoRA adapter's hub base model (default: "
                      "main, or the one its adapter_config.json names)")


def _add_load_flags(parser: argparse.ArgumentParser, code_of: str, dtype_of: str, revision_help: str) -> None:
    """How a command loads its models and tokenizers: training's model.trust_remote_code, model.dtype
    and model.revision, as flags."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=f"run the model code {code_of} brings (auto_map in config.json): only code you trust")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help=f"dtype of {dtype_of} (default: auto, the checkpoint's own)")
    parser.add_argument("--revision", default=None, metavar="REV", help=revision_help)


def _cmd_train(args: argparse.Namespace) -> int:
    from orpo.config import load_config
    from orpo.train import TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except TrainingDiverged as e:
        _say_once(f"orpo train: error: {e}")
        return EXIT_DIVERGED
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orpo.sweep import Sweep, describe, parse_grid

    swept, fixed = parse_grid(args.overrides)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    sweep = Sweep(args.config, swept, fixed, sort=args.sort, metrics=metrics, stop_on_failure=args.stop_on_failure)
    if args.dry_run:
        print(describe(sweep), end="")
        return 0
    runs = sweep.run()
    print(sweep.write())
    print(f"\ntable: {sweep.output_dir / 'sweep' / 'sweep.md'}", file=sys.stderr)
    print(sweep.report(), file=sys.stderr)
    failed = [r.name for r in runs if r.status == "failed"]
    if failed:
        print(f"orpo sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return EXIT_FAILED_RUNS if failed else 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from orpo.config import load_config
    from orpo.data import prepare_data
    from orpo.train.model import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, tokenizer, chat_template=cfg.model.chat_template, seed=cfg.train.seed)
    print(prepared.summary.render())
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from orpo.data.audit import audit

    columns = dict(zip(("prompt", "chosen", "rejected"), args.columns, strict=True)) if args.columns else None
    report = audit(args.data, format=args.format, columns=columns, split=args.split, eval=args.eval,
                   model=args.model, chat_template=args.chat_template, max_length=args.max_length,
                   max_prompt_length=args.max_prompt_length, min_response_tokens=args.min_response_tokens,
                   batch_size=args.batch_size)
    print(report.dumps() if args.json else report.render())
    return 0


EVAL_KEYS = {"pairs": "pairs", "accuracy": "accuracy", "logps_chosen": "logps_chosen",
             "logps_rejected": "logps_rejected", "log_odds_ratio": "log_odds_ratio", "margin": "margin",
             "nll": "nll_loss", "or_loss": "or_loss", "loss": "loss"}


def _cmd_eval(args: argparse.Namespace) -> int:
    """Each model scores the same pairs (tokenized with its own tokenizer); one row per model."""
    import gc

    from orpo.config import DataConfig
    from orpo.data import prepare_data
    from orpo.data.collate import resolve_layout
    from orpo.train.evaluate import evaluate, load_for_inference, print_eval_table
    from orpo.train.objective import ORPOObjective

    data_cfg = DataConfig(
        train=args.data, train_split=args.split, format=args.format, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, max_samples=args.max_samples,
    )
    results: list[dict] = []
    for name in args.model:
        model, tokenizer = load_for_inference(name, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                              revision=args.revision, flags=True)
        prepared = prepare_data(data_cfg, tokenizer, chat_template=args.chat_template)
        if len(results) == 0:
            print(prepared.summary.render(), file=sys.stderr)
        layout, line = resolve_layout(args.layout, model, tokenizer.pad_token_id, args.max_length)
        print(f"{name}: {line}", file=sys.stderr)
        m = evaluate(model, prepared.train, layout, batch_size=args.batch_size, objective=ORPOObjective(beta=args.beta))
        results.append({"model": name, **{k: m[v] for k, v in EVAL_KEYS.items()}})
        del model
        gc.collect()
    if args.json:
        print(json.dumps(results))
    else:
        print_eval_table(results, title=f"ORPO metrics on {args.data} (λ = {args.beta:g})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Batched (``orpo.generation``): the replies equal one-prompt-at-a-time generation, token for token."""
    from orpo.config import ConfigError
    from orpo.data.formats import Message, Pair
    from orpo.data.prompts import PromptRow, read_prompts
    from orpo.data.templates import render_prompt, resolve_chat_template
    from orpo.data.tokenize import encode_prompt
    from orpo.disk import output_file, write_atomic
    from orpo.generation import Sampling, generate
    from orpo.train.evaluate import load_for_inference

    if args.batch_size < 1 or args.max_new_tokens < 1 or not 0 < args.top_p <= 1 or args.temperature < 0:
        raise ConfigError("--batch-size and --max-new-tokens must be at least 1, --top-p in (0, 1], "
                          "--temperature at least 0")
    if args.out and not args.prompts:
        raise ConfigError("--out is for --prompts (one prompt's reply is printed)")
    out = output_file(args.out, "--out", lambda row: {"completion", "new_tokens"} <= row.keys()) if args.out else None
    if args.prompts:
        rows = read_prompts(args.prompts)
    else:
        rows = [PromptRow(args.prompt, 1, "--prompt")]
    model, tokenizer = load_for_inference(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                          revision=args.revision, flags=True)
    template = resolve_chat_template(args.chat_template, tokenizer)

    def with_system(prompt: str | list[Message]) -> str | list[Message]:
        """``--system`` goes first, unless the row brings its own system message."""
        if not args.system:
            return prompt
        turns = prompt if isinstance(prompt, list) else [Message(role="user", content=prompt)]
        return turns if turns[0]["role"] == "system" else [Message(role="system", content=args.system), *turns]

    # the same BOS rule as training, so the model sees what it was trained on
    ids = [encode_prompt(render_prompt(Pair(prompt=with_system(r.prompt), chosen="x", rejected="y"), template,
                                       tokenizer), tokenizer) for r in rows]
    new = generate(model, ids, args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, device=model.device, batch_size=args.batch_size,
                   sampling=Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    replies = [tokenizer.decode(n, skip_special_tokens=True).strip() for n in new]
    if not args.prompts:
        print(replies[0])
        return 0
    lines = "".join(json.dumps({"row": r.number, "prompt": r.prompt, "completion": c, "new_tokens": len(n)},
                               ensure_ascii=False) + "\n" for r, c, n in zip(rows, replies, new, strict=True))
    if out is not None:
        write_atomic(out, lines.encode())
        print(f"{len(rows)} replies written to {args.out}")
    else:
        sys.stdout.write(lines)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from orpo.train.merge import merge_lora

    path = merge_lora(args.adapter, args.output, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      revision=args.revision)
    print(f"merged model written to {path}")
    return 0


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    """One line per checkpoint; exit status 1 when the newest one is not complete."""
    from orpo.train.checkpoint import checkpoint_root, inspect_checkpoint, step_folders

    folders = step_folders(args.output_dir)
    if not folders:
        print(f"no checkpoints in {checkpoint_root(args.output_dir)}")
        return 0
    statuses = [inspect_checkpoint(f, checksums=not args.no_checksums) for f in folders]
    for status in statuses:
        print(status.describe())
    return 0 if statuses[-1].complete else 1
def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orpo.report import write_report

    if args.name is not None and len(args.name) != len(args.runs):
        print(f"orpo report: error: {len(args.name)} --name for {len(args.runs)} runs", file=sys.stderr)
        return EXIT_USAGE
    page = write_report([Path(p) for p in args.runs], Path(args.out), names=args.name)
    print(page)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Every check that needs no network first (folder, repo id, token), then one commit."""
    from pathlib import Path

    from orpo import hub

    folder = Path(args.folder)
    hub.check_model_folder(folder)
    hub.check_repo_id(args.repo, "--repo")
    if args.revision is not None and (not args.revision.strip() or args.revision != args.revision.strip()):
        raise hub.HubError(f"--revision: '{args.revision}' is not a branch name")
    hub.files_to_push(folder)  # a symlink inside is refused here, before the network
    token = hub.hub_token()
    pushed = hub.push_folder(folder, args.repo, private=args.private, revision=args.revision,
                             message=args.message or f"orpo push {folder}", token=token)
    print(pushed.describe(args.repo, args.revision))
    return 0


def _cmd_config_doc(args: argparse.Namespace) -> int:
    from orpo.config import config_doc

    print(config_doc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
