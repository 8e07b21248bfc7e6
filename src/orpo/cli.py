"""The `orpo` command line: train, sweep, preprocess, eval, generate, merge, config-doc.

Every command reports bad input (configuration, data) as one clear message on stderr and exit
status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

EXIT_FAILED_RUNS = 1  # `orpo sweep`: some runs failed (they are in the table)
EXIT_USAGE = 2  # bad configuration or data: one message, nothing trained
EXIT_STOPPED = 4  # stopped before the last step when asked (a signal): resume with train.resume=auto

TRAIN_EPILOG = """\
CONFIG is a YAML file with sections model, data, orpo, train; any key can be overridden with
key.path=value (parsed as YAML), e.g.  orpo train cfg.yaml train.max_steps=100 orpo.beta=0.2
Every key, its default and its meaning: docs/configuration.md (or `orpo config-doc`).
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
    from orpo.train.trainer import TrainingStopped

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own progress is enough

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"orpo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as e:
        print(f"orpo {args.command}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"orpo {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orpo", description="ORPO preference training for causal language models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train from a YAML config", epilog=TRAIN_EPILOG,
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

    e = sub.add_parser("eval", help="ORPO metrics of a model on preference pairs (JSON on stdout)")
    e.add_argument("--model", required=True, help="model folder (a final/ or checkpoint) or hub name")
    e.add_argument("--data", required=True, help="preference data file or hub dataset")
    e.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    e.add_argument("--format", default="auto", help="auto | standard | implicit | conversational | sharegpt")
    e.add_argument("--max-length", type=int, default=1024)
    e.add_argument("--max-prompt-length", type=int, default=None)
    e.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--beta", type=float, default=0.1, help="λ used for the reported loss")
    e.add_argument("--max-samples", type=int, default=None)
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="generate a reply to one prompt (chat template applied)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--chat-template", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    m.add_argument("adapter", help="adapter folder (e.g. OUTPUT_DIR/final)")
    m.add_argument("output", help="where to write the merged model")
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser("config-doc", help="print the configuration reference (Markdown)")
    c.set_defaults(func=_cmd_config_doc)
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from orpo.config import load_config
    from orpo.train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from orpo.config import DataConfig
    from orpo.data import prepare_data
    from orpo.train.evaluate import evaluate, load_for_inference, print_eval_table
    from orpo.train.objective import ORPOObjective

    model, tokenizer = load_for_inference(args.model)
    data_cfg = DataConfig(
        train=args.data, train_split=args.split, format=args.format, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, max_samples=args.max_samples,
    )
    prepared = prepare_data(data_cfg, tokenizer, chat_template=args.chat_template)
    print(prepared.summary.render(), file=sys.stderr)
    m = evaluate(model, prepared.train, tokenizer.pad_token_id, batch_size=args.batch_size,
                 objective=ORPOObjective(beta=args.beta))
    result = {
        "pairs": m["pairs"],
        "accuracy": m["accuracy"],
        "logps_chosen": m["logps_chosen"],
        "logps_rejected": m["logps_rejected"],
        "log_odds_ratio": m["log_odds_ratio"],
        "nll": m["nll_loss"],
        "or_loss": m["or_loss"],
        "loss": m["loss"],
    }
    print_eval_table(result, title=f"{args.model} on {args.data}")
    print(json.dumps(result))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from orpo.data.formats import Message, Pair
    from orpo.data.templates import render_prompt, resolve_chat_template
    from orpo.data.tokenize import encode_prompt
    from orpo.train.evaluate import load_for_inference

    torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(args.model)
    template = resolve_chat_template(args.chat_template, tokenizer)
    messages: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    text = render_prompt(Pair(prompt=messages, chosen="x", rejected="y"), template, tokenizer)
    # the same BOS rule as training, so the model sees what it was trained on
    input_ids = torch.tensor([encode_prompt(text, tokenizer)], device=model.device)
    ids = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    out = model.generate(**ids, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(reply.strip())
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from orpo.train.merge import merge_lora

    path = merge_lora(args.adapter, args.output)
    print(f"merged model written to {path}")
    return 0


def _cmd_config_doc(args: argparse.Namespace) -> int:
    from orpo.config import config_doc

    print(config_doc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
