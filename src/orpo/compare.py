"""``orpo compare --model A --model B --prompts FILE --judge JUDGE``: which model answers better.

An AlpacaEval / MT-Bench-style pairwise comparison. Both models answer every prompt (batched, greedy
unless ``--sample``; each with its own chat template, or ``--chat-template-a`` / ``-b``), as ``orpo
generate --prompts`` does. A judge (``orpo.judge``: a local model, or any OpenAI-compatible endpoint)
reads each question with the two answers, in both orders to cancel its position bias
(``judge_both_orders``); the prompt it is asked is documented in ``orpo/judge.py``.

What is reported, for A against B over n prompts:

- **wins / ties / losses**: A's answer judged better in both orders, or in one with a tie in the
  other, is a win; a disagreement between the orders is a tie (so is a reply with no verdict in it,
  counted apart as ``unparsed``).
- **win rate** = (wins + ties / 2) / n, with a 95% **Wilson score interval** (z = 1.96) computed as
  if the per-prompt score (1, 1/2 or 0) were a coin: a tie scores 1/2 with less spread than a coin,
  so the interval is at least as wide as the data need (conservative), and always inside [0, 1].
- **mean answer lengths**, in each model's own tokens (the EOS not counted) and in characters.
- **length-controlled view**: a judge tends to prefer the longer answer, so the win rate is also
  given within bins of the length ratio r = (chars of A + 1) / (chars of B + 1), in characters so
  that two tokenizers compare: ``A shorter`` (r < 0.8), ``similar`` (0.8 <= r <= 1.25), ``A longer``
  (r > 1.25). A model that only wins when it is longer shows it here.

Everything that needs no model is checked first (flags, the judge, the prompts file and every row,
the --out path, a served judge's ``/models``): a mistake exits 2 and writes nothing. ``--out
FILE.jsonl`` writes one row per prompt (``write_atomic``); ``--out DIR`` (any other name) writes
``answers.jsonl`` and ``summary.json`` into a folder orpo owns (``publish_owned``, kind ``compare``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EPILOG = """\
The judge sees each question twice, the answers swapped; its prompt is documented in orpo/judge.py.
Win rate = (wins + ties/2) / n with a 95% Wilson interval; the length bins are by the answers' character
ratio r = (len A + 1) / (len B + 1): A shorter r < 0.8, similar 0.8..1.25, A longer r > 1.25.
--out FILE.jsonl: one row per prompt; --out DIR: DIR/answers.jsonl and DIR/summary.json.
Exit status 0 done, 2 bad input (before any model loads; nothing written).
"""

Z95 = 1.96
# (name, upper bound of the ratio r = (chars A + 1) / (chars B + 1), inclusive) in order
LENGTH_BINS = (("A shorter", 0.8, False), ("similar", 1.25, True), ("A longer", math.inf, True))
OUTCOMES = {"first": "A", "second": "B", "tie": "tie"}


def add_parser(sub: Any) -> None:
    from orpo.cli import LOAD_REVISION_HELP, _add_load_flags

    p = sub.add_parser("compare", help="judge two models' answers to the same prompts: win rate of A over B",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="model folder or hub name; give it twice: --model A --model B")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="a file (or hub dataset) of prompts, as `orpo generate --prompts` reads it")
    p.add_argument("--judge", default=None, metavar="MODEL", help="a local judge model (folder or hub name)")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="an OpenAI-compatible judge endpoint (vLLM, transformers serve); key from ORPO_JUDGE_API_KEY")
    p.add_argument("--judge-model", default=None, metavar="NAME",
                   help="with --judge-url: the served model's name (default: the first the server lists)")
    p.add_argument("--judge-max-tokens", type=int, default=512,
                   help="with --judge-url: the longest judge reply, in tokens (default: 512)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N prompts only")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens (default: 256)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per generation batch, and questions per local-judge forward / 4 (default: 16)")
    p.add_argument("--sample", action="store_true", help="sample the answers (seeded) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default: 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default: 0)")
    p.add_argument("--chat-template-a", default=None, help="none | chatml | llama3 | zephyr | FILE.jinja "
                   "(default: model A's own, else none)")
    p.add_argument("--chat-template-b", default=None, help="the same for model B")
    p.add_argument("--out", default=None, metavar="FILE.jsonl|DIR",
                   help="write every answer and verdict: a .jsonl file, or a folder (answers.jsonl, summary.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    _add_load_flags(p, "each --model and --judge", "the models and the local judge", LOAD_REVISION_HELP)
    p.set_defaults(func=run_command)


@dataclass(frozen=True)
class Output:
    """Where ``--out`` writes: one JSONL file, or an owned folder of answers.jsonl + summary.json."""

    path: Path
    folder: bool


def run_command(args: argparse.Namespace) -> int:
    from orpo.data.prompts import read_prompts
    from orpo.generation import Sampling

    started = time.monotonic()
    check_flags(args)
    sampling = Sampling(temperature=args.temperature or 1.0, top_p=args.top_p or 1.0, seed=args.seed) \
        if args.sample else Sampling(seed=args.seed)
    out = check_out(args.out)
    for key, name in (("--model", args.model[0]), ("--model", args.model[1]), ("--judge", args.judge)):
        check_local(key, name)
    rows = read_prompts(args.prompts)[: args.limit]
    # a served judge is asked for its models now: an unreachable server fails before any model loads
    judge = _served_judge(args) if args.judge_url else None

    answers = []
    for model, template in ((args.model[0], args.chat_template_a), (args.model[1], args.chat_template_b)):
        answers.append(generate_answers(model, [r.prompt for r in rows], template, args, sampling))
        print(f"{model}: {len(rows)} answers", file=sys.stderr)
    if judge is None:
        judge = _local_judge(args)
    questions = [question_text(r.prompt) for r in rows]
    verdicts = judge_pairs(judge, questions, [a.text for a in answers[0]], [b.text for b in answers[1]])

    summary = summarize(args.model[0], args.model[1], judge.name, answers[0], answers[1], verdicts,
                        seconds=time.monotonic() - started)
    if out is not None:
        write_out(out, rows, answers[0], answers[1], verdicts, summary)
        summary["out"] = str(out.path)
    if args.json:
        print(json.dumps(summary))
    else:
        print_report(summary)
    return 0


def check_flags(args: argparse.Namespace) -> None:
    from orpo.config import ConfigError

    if len(args.model) != 2:
        raise ConfigError(f"--model: give exactly two models (--model A --model B), got {len(args.model)}")
    if (args.judge is None) == (args.judge_url is None):
        raise ConfigError("name one judge: --judge MODEL (a local model) or --judge-url URL (an OpenAI-compatible "
                          "endpoint), not both")
    if args.judge_model is not None and args.judge_url is None:
        raise ConfigError("--judge-model names a served model: it is for --judge-url")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.judge_max_tokens < 1:
        raise ConfigError("--batch-size, --max-new-tokens and --judge-max-tokens must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ConfigError("--temperature and --top-p are for --sample (without it the answers are greedy)")
    if args.sample and (not (args.temperature or 1.0) > 0 or not 0 < (args.top_p or 1.0) <= 1):
        raise ConfigError("--temperature must be above 0 and --top-p in (0, 1]")
    if args.temperature is not None and args.temperature <= 0:
        raise ConfigError(f"--temperature must be above 0 with --sample, got {args.temperature}")


def check_out(spec: str | None) -> Output | None:
    """The --out target, checked touching nothing: a .jsonl file in an existing folder, or a folder
    orpo may own (new, empty, or an earlier ``orpo compare --out``)."""
    from orpo import disk

    if spec is None:
        return None
    path = disk.expand(spec)
    if path.suffix == ".jsonl" and not path.is_dir():
        return Output(disk.output_file(spec, "--out", lambda row: {"answer_a", "answer_b", "outcome"} <= row.keys()),
                      folder=False)
    disk.inspect_folder(path, "compare", "orpo compare --out")
    return Output(path, folder=True)


def check_local(key: str, name: str | None) -> None:
    """A model named by a path must be a folder now, not after the other model has answered."""
    from orpo.config import ConfigError
    from orpo.loading import local_path, looks_local

    if name is not None and looks_local(name) and not Path(local_path(name)).is_dir():
        raise ConfigError(f"{key} {name}: no such folder ({Path(local_path(name)).absolute()}); a path is never "
                          "looked up on the hub: check the path")


def _served_judge(args: argparse.Namespace):
    from orpo.judge import build_judge

    return build_judge(None, args.judge_url, model=args.judge_model, max_tokens=args.judge_max_tokens)


def _local_judge(args: argparse.Namespace):
    from orpo.judge import build_judge

    return build_judge(args.judge, None, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       revision=args.revision, batch_size=max(1, args.batch_size // 4))


@dataclass(frozen=True)
class Answer:
    """One model's answer: the text, and its length in the model's own tokens (EOS not counted)."""

    text: str
    tokens: int


def generate_answers(name: str, prompts: list, chat_template: str | None, args: argparse.Namespace,
                     sampling) -> list[Answer]:
    """``orpo generate --prompts``'s answers: the model's template (or ``chat_template``), training's BOS
    rule, batched left-padded generation; the model is freed before the next one loads."""
    from orpo.data.formats import Pair
    from orpo.data.templates import render_prompt, resolve_chat_template
    from orpo.data.tokenize import encode_prompt
    from orpo.generation import generate
    from orpo.train.evaluate import load_for_inference

    model, tokenizer = load_for_inference(name, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                          revision=args.revision, flags=True)
    template = resolve_chat_template(chat_template, tokenizer)
    ids = [encode_prompt(render_prompt(Pair(prompt=p, chosen="x", rejected="y"), template, tokenizer), tokenizer)
           for p in prompts]
    new = generate(model, ids, args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, device=model.device, batch_size=args.batch_size,
                   sampling=sampling)
    eos = tokenizer.eos_token_id
    out = [Answer(tokenizer.decode(n, skip_special_tokens=True).strip(),
                  len(n) - (1 if n and eos is not None and n[-1] == eos else 0)) for n in new]
    del model
    gc.collect()
    return out


def question_text(prompt: str | list) -> str:
    """The question as the judge reads it: the text, or a conversation's turns as ``Role: text``."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def judge_pairs(judge, questions: list[str], answers_a: list[str], answers_b: list[str]) -> list:
    from orpo.judge import judge_both_orders

    return judge_both_orders(judge, questions, answers_a, answers_b)


def wilson(score: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``score`` over ``n`` trials (inside [0, 1])."""
    if n == 0:
        return (0.0, 1.0)
    denominator = 1 + z * z / n
    centre = (score + z * z / (2 * n)) / denominator
    half = z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def length_bin(chars_a: int, chars_b: int) -> str:
    """Which length bin a pair falls in: by r = (chars A + 1) / (chars B + 1)."""
    r = (chars_a + 1) / (chars_b + 1)
    for name, upper, inclusive in LENGTH_BINS:
        if r < upper or (inclusive and r == upper):
            return name
    raise AssertionError("unreachable: the last bin is unbounded")


def tally(outcomes: list[str]) -> dict[str, Any]:
    """Wins, ties, losses of A ("A", "tie", "B" per prompt) and the win rate with its 95% interval."""
    n = len(outcomes)
    wins, ties, losses = outcomes.count("A"), outcomes.count("tie"), outcomes.count("B")
    rate = (wins + ties / 2) / n if n else None
    lo, hi = wilson(rate, n) if rate is not None else (None, None)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "win_rate": rate, "win_rate_ci95": [lo, hi]}


def summarize(model_a: str, model_b: str, judge: str, answers_a: list[Answer], answers_b: list[Answer],
              verdicts: list, seconds: float) -> dict[str, Any]:
    """The one JSON object ``--json`` prints (and ``--out DIR`` keeps as summary.json)."""
    outcomes = [OUTCOMES[v.outcome] for v in verdicts]
    n = len(outcomes)
    bins: dict[str, list[str]] = {name: [] for name, _, _ in LENGTH_BINS}
    for a, b, o in zip(answers_a, answers_b, outcomes, strict=True):
        bins[length_bin(len(a.text), len(b.text))].append(o)
    unparsed = sum((not v.forward.parsed) + (not v.backward.parsed) for v in verdicts)
    return {"model_a": model_a, "model_b": model_b, "judge": judge, **tally(outcomes),
            "mean_length_a": _mean_length(answers_a), "mean_length_b": _mean_length(answers_b),
            "length_bins": [{"bin": name, **tally(found)} for name, found in bins.items()],
            "unparsed_verdicts": unparsed, "judgments": 2 * n, "seconds": round(seconds, 3)}


def _mean_length(answers: list[Answer]) -> dict[str, float]:
    n = max(1, len(answers))
    return {"tokens": sum(a.tokens for a in answers) / n, "chars": sum(len(a.text) for a in answers) / n}


def answer_rows(rows: list, answers_a: list[Answer], answers_b: list[Answer], verdicts: list) -> str:
    """One JSON line per prompt. ``forward`` showed A's answer first (as "A"), ``backward`` B's; each
    ``winner`` is the position the judge named ("A", "B", "tie"); ``outcome`` is the model that won."""
    lines = []
    for r, a, b, v in zip(rows, answers_a, answers_b, verdicts, strict=True):
        lines.append(json.dumps({
            "row": r.number, "prompt": r.prompt, "answer_a": a.text, "answer_b": b.text, "tokens_a": a.tokens,
            "tokens_b": b.tokens, "forward": _verdict(v.forward), "backward": _verdict(v.backward),
            "outcome": OUTCOMES[v.outcome], "length_bin": length_bin(len(a.text), len(b.text)),
        }, ensure_ascii=False) + "\n")
    return "".join(lines)


def _verdict(one) -> dict[str, Any]:
    return {"winner": one.winner, "raw": one.raw, "parsed": one.parsed}


def write_out(out: Output, rows: list, answers_a: list[Answer], answers_b: list[Answer], verdicts: list,
              summary: dict[str, Any]) -> None:
    """All at once at the end: a file by ``write_atomic``, a folder by ``publish_owned`` (one rename)."""
    from orpo import disk

    text = answer_rows(rows, answers_a, answers_b, verdicts).encode("utf-8")
    if not out.folder:
        disk.write_atomic(out.path, text)
        return
    with disk.publish_owned(out.path, "compare", "orpo compare --out") as tmp:
        disk.write_atomic(tmp / "answers.jsonl", text)
        disk.write_atomic(tmp / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))


def print_report(summary: dict[str, Any]) -> None:
    """Two tables on stdout: the overall result, and the win rate within each length bin."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # piped: rich would squeeze the columns into 80 characters
        console = Console(width=250)
    s = summary
    top = Table(title=f"{s['model_a']} (A) vs {s['model_b']} (B), judged by {s['judge']}")
    for column in ("n", "wins", "ties", "losses", "win rate of A", "95% CI (Wilson)", "tokens A", "tokens B",
                   "chars A", "chars B"):
        top.add_column(column, justify="right")
    top.add_row(str(s["n"]), str(s["wins"]), str(s["ties"]), str(s["losses"]), _rate(s["win_rate"]),
                _ci(s["win_rate_ci95"]), f"{s['mean_length_a']['tokens']:.1f}", f"{s['mean_length_b']['tokens']:.1f}",
                f"{s['mean_length_a']['chars']:.1f}", f"{s['mean_length_b']['chars']:.1f}")
    console.print(top)
    bins = Table(title="length-controlled: win rate of A by answer length ratio (chars A + 1) / (chars B + 1)")
    for column in ("bin", "n", "wins", "ties", "losses", "win rate of A", "95% CI (Wilson)"):
        bins.add_column(column, justify="left" if column == "bin" else "right")
    for b in s["length_bins"]:
        bins.add_row(b["bin"], str(b["n"]), str(b["wins"]), str(b["ties"]), str(b["losses"]), _rate(b["win_rate"]),
                     _ci(b["win_rate_ci95"]))
    console.print(bins)
    if s["unparsed_verdicts"]:
        console.print(f"{s['unparsed_verdicts']} of {s['judgments']} judge replies had no [[A]]/[[B]]/[[C]] "
                      "verdict (counted as ties): check the judge")
    console.print(f"{s['seconds']:.1f} s")


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(ci: list) -> str:
    return "–" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
