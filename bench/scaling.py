"""How a training step and ``orpo preprocess`` grow with the work: `make bench-scaling`; see bench/README.md.

Two parts, each point in its own fresh process, one at a time:

- **train**: orpo's default against TRL's ORPOTrainer (``bench/run.py``'s machinery and checks,
  first-step losses included) at ``max_length`` 512 … 4,096 (vocab 65,536) and at vocab 8,192 …
  151,936 (``max_length`` 1,024). The pairs fill ``max_length``: each HH pair's prompt is preceded
  by whole HH dialogues until prompt + response reach ~90% of it. Every child runs under a memory
  cap (``RLIMIT_DATA``, default 16 GiB of this 24 GiB machine): a system that needs more fails to
  allocate and is recorded as out of memory.
- **preprocess**: ``orpo preprocess`` (stories260K's tokenizer, ``max_length`` 1,024) on the shared
  HH pairs repeated with unique prompts to 6k, 61k and 200k pairs, and on 2,000 pairs whose
  responses are 8k characters of similar wording (the near-identical check's worst case): seconds
  and the child's peak RSS (``wait4``).

Results: bench/results/scaling.json and bench/results/scaling.png (log-log).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import run as bench

ROOT = bench.ROOT
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "assets" / "stories260K" / "hf"
LENGTHS = (512, 1024, 2048, 4096)
VOCABS = {8192: "small-vocab", 65536: "large-vocab", 151936: "vocab-151936"}
SYSTEMS = ("orpo", "trl")
PREPROCESS_SIZES = (6_000, 61_000, 200_000)
LONG_PAIRS, LONG_CHARS = 2_000, 8_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["train", "preprocess"], choices=["train", "preprocess"])
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="max_length series (vocab 65,536)")
    p.add_argument("--vocabs", nargs="+", type=int, default=list(VOCABS), choices=list(VOCABS),
                   help="vocabulary series (max_length 1,024)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point")
    p.add_argument("--mem-cap-gb", type=float, default=16.0, help="memory cap of every training child")
    p.add_argument("--sizes", nargs="+", type=int, default=list(PREPROCESS_SIZES), help="preprocess: pairs")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "scaling")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    return p.parse_args(argv)


def hh_pairs() -> list[dict]:
    """The shared HH pairs as orpo reads them (prompt, chosen, rejected), in file order, as bench/run.py."""
    from orpo.data.formats import normalize
    from orpo.data.sources import load_rows

    pairs = normalize(load_rows(str(bench.HH)), on_bad_row="skip").pairs
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


# ---------------------------------------------------------------------------------------------
# Training steps


def filled_pairs(pairs: list[dict], tokenizer, max_length: int, count: int) -> list[dict]:
    """``count`` pairs whose longer sequence is ~90% of ``max_length``: HH dialogues prepended to the prompt."""
    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    dialogues = [p["prompt"] + p["chosen"] for p in pairs]
    sizes = [n(d) for d in dialogues]
    out, j = [], 0
    for p in pairs:
        if len(out) == count:
            break
        need = int(0.9 * max_length) - n(p["prompt"]) - max(n(p["chosen"]), n(p["rejected"]))
        if need < 0:
            continue
        context: list[str] = []
        while need > sizes[j % len(sizes)]:
            context.append(dialogues[j % len(dialogues)])
            need -= sizes[j % len(sizes)]
            j += 1
        out.append({"prompt": "".join(context) + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]})
    return out


def train_point(args: argparse.Namespace, max_length: int, vocab: int, data: Path) -> dict:
    """``bench/run.py`` for one (max_length, vocab): its JSON for that setting, TRL's failure kept."""
    results = args.out / f"train-{max_length}-{vocab}.json"
    argv = ["--settings", VOCABS[vocab], "--systems", *args.systems, "--max-length", str(max_length),
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", "1",
            "--data", str(data), "--out", str(args.out / f"run-{max_length}"), "--results", str(results),
            "--mem-cap-gb", str(args.mem_cap_gb)]
    print(f"max_length {max_length:>5}  vocab {vocab:>7}", flush=True)
    code = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *argv], cwd=ROOT).returncode
    report = json.loads(results.read_text())
    point = report["configs"][VOCABS[vocab]]
    point["exit_code"] = code
    return {"machine": report["machine"], "point": point}


def train_part(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    pairs = hh_pairs()
    tok_dir = args.out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        bench.build_tokenizer(tok_dir, bench.TOKENIZER_VOCAB, [p["prompt"] + p[r] for p in pairs
                                                            for r in ("chosen", "rejected")])
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    points = sorted({(n, 65536) for n in args.lengths} | {(1024, v) for v in args.vocabs})
    out: dict = {"points": []}
    for max_length, vocab in points:
        data = args.out / f"filled-{max_length}.jsonl"
        if not data.exists():
            rows = filled_pairs(pairs, tokenizer, max_length, 8 * args.batch_size * (args.steps + 1))
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # every run.py of this part shares one tokenizer (the HH BPE), built once above
        run_dir = args.out / f"run-{max_length}"
        run_dir.mkdir(parents=True, exist_ok=True)
        link = run_dir / f"tokenizer-{bench.TOKENIZER_VOCAB}"
        if not link.exists():
            link.symlink_to(tok_dir.resolve(), target_is_directory=True)
        r = train_point(args, max_length, vocab, data)
        out["machine"] = r["machine"]
        row = {"max_length": max_length, "vocab": vocab, "exit_code": r["point"]["exit_code"]}
        for system in args.systems:
            s = r["point"].get(system, {})
            if "tokens_per_s" in s:
                row[system] = {k: s[k] for k in ("tokens_per_s", "peak_mem_mb", "peak_rss_mb", "s_per_step",
                                                  "tokens_per_step", "first_loss", "mfu") if k in s}
            else:
                row[system] = {"oom": bool(s.get("oom")), "error": str(s.get("error", "?")).strip()[-300:]}
        row["loss_check"] = r["point"].get("loss_check")
        out["points"].append(row)
    out["slopes"] = slopes(out["points"], args.systems)
    return out


def slopes(points: list[dict], systems) -> dict:
    """Least-squares slope of log(training memory) and log(tokens/s) against log(max_length) and log(vocab)."""
    def fit(xs, ys):
        if len(xs) < 2:
            return None
        lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
        mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
        return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)

    out: dict = {}
    for system in systems:
        for axis, fixed in (("max_length", ("vocab", 65536)), ("vocab", ("max_length", 1024))):
            ok = [p for p in points if p[fixed[0]] == fixed[1] and "peak_mem_mb" in p.get(system, {})]
            out[f"{system}_memory_vs_{axis}"] = fit([p[axis] for p in ok], [p[system]["peak_mem_mb"] for p in ok])
    return out


# ---------------------------------------------------------------------------------------------
# orpo preprocess


def repeated_pairs(path: Path, pairs: list[dict], n: int) -> None:
    """``n`` pairs: the HH pairs over and over, each prompt made unique by its number."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            p = pairs[i % len(pairs)]
            f.write(json.dumps({"prompt": f"[#{i}] " + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]})
                    + "\n")


def long_pairs(path: Path, pairs: list[dict], n: int, chars: int) -> None:
    """``n`` pairs with ``chars``-character responses; rejected is chosen with every 50th word changed."""
    text = " ".join(p["chosen"] for p in pairs)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            start = (i * 997) % (len(text) - chars)
            chosen = text[start:start + chars]
            words = chosen.split(" ")
            rejected = " ".join("not" if k % 50 == 7 else w for k, w in enumerate(words))
            f.write(json.dumps({"prompt": f"[#{i}] " + pairs[i % len(pairs)]["prompt"], "chosen": chosen,
                                "rejected": rejected}) + "\n")


def preprocess_point(args: argparse.Namespace, data: Path, name: str) -> dict:
    """``orpo preprocess`` on ``data`` in a child: wall seconds and the child's peak RSS (from ``wait4``)."""
    config = args.out / f"preprocess-{name}.yaml"
    cache = args.out / f"cache-{name}"
    if cache.is_dir():  # the bench's own cache from an earlier run: a hit would time nothing
        shutil.rmtree(cache)
    config.write_text(json.dumps({
        "model": {"init": {"arch": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "vocab_size": 512}, "tokenizer": str(STORIES),
                  "chat_template": "none"},
        "data": {"train": str(data), "max_length": 1024, "cache_dir": str(cache)},
        "train": {"output_dir": str(args.out / "unused")}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "orpo"), "preprocess", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    print(f"preprocess {name:<14} {seconds:>7.1f} s  {usage.ru_maxrss / 1024:>7,.0f} MiB peak RSS  exit {code}",
          flush=True)
    return {"name": name, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "exit_code": code,
            "input_mb": data.stat().st_size / 2**20, "loadavg_1min_before": load,
            "output_tail": output[-600:] if code else None}


def preprocess_part(args: argparse.Namespace) -> dict:
    pairs = hh_pairs()
    out: dict = {"points": []}
    for n in args.sizes:
        data = args.out / f"hh-{n}.jsonl"
        if not data.exists():
            repeated_pairs(data, pairs, n)
        out["points"].append({"pairs": n, **preprocess_point(args, data, f"{n}-pairs")})
    data = args.out / f"long-{LONG_PAIRS}x{LONG_CHARS}.jsonl"
    if not data.exists():
        long_pairs(data, pairs, LONG_PAIRS, LONG_CHARS)
    out["long_responses"] = {"pairs": LONG_PAIRS, "response_chars": LONG_CHARS,
                             **preprocess_point(args, data, f"{LONG_PAIRS}x{LONG_CHARS}-chars")}
    return out


# ---------------------------------------------------------------------------------------------
# Report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    points = report.get("train", {}).get("points", [])
    for ax, (axis, fixed) in zip(axes[:2], (("max_length", ("vocab", 65536)), ("vocab", ("max_length", 1024))), strict=True):
        for system, style in (("orpo", "o-"), ("trl", "s--")):
            sel = [p for p in points if p[fixed[0]] == fixed[1] and system in p]
            ok = [p for p in sel if "peak_mem_mb" in p[system]]
            if not ok:
                continue
            ax.plot([p[axis] for p in ok], [p[system]["peak_mem_mb"] for p in ok], style, label=f"{system} memory")
            for p in sel:
                if p[system].get("oom"):
                    ax.annotate(f"{system}: out of memory", (p[axis], ax.get_ylim()[1]), fontsize=8, ha="center",
                                va="top", color="red")
        ax.set(xscale="log", yscale="log", xlabel=axis, ylabel="training memory (MiB)",
               title=f"training memory vs {axis} ({fixed[0]} {fixed[1]:,})")
        if ax.lines:
            ax.legend(fontsize=8)
    pre = report.get("preprocess", {}).get("points", [])
    if pre:
        ax = axes[2]
        ax.plot([p["pairs"] for p in pre], [p["peak_rss_mb"] for p in pre], "o-", label="peak RSS (MiB)")
        ax.plot([p["pairs"] for p in pre], [p["seconds"] for p in pre], "s--", label="seconds")
        ax.set(xscale="log", yscale="log", xlabel="pairs", title="orpo preprocess")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(report: dict) -> None:
    train = report.get("train")
    if train:
        print(f"\n{'max_length':>10}{'vocab':>9}{'orpo tok/s':>12}{'orpo MiB':>10}{'trl tok/s':>11}{'trl MiB':>10}"
              f"{'speed':>8}{'memory':>8}")
        for p in train["points"]:
            o, t = p.get("orpo", {}), p.get("trl", {})
            cells = [f"{o['tokens_per_s']:>12,.0f}{o['peak_mem_mb']:>10,.0f}" if "tokens_per_s" in o
                     else f"{'OOM' if o.get('oom') else 'failed':>22}",
                     f"{t['tokens_per_s']:>11,.0f}{t['peak_mem_mb']:>10,.0f}" if "tokens_per_s" in t
                     else f"{'OOM' if t.get('oom') else ('failed' if t else '-'):>21}"]
            ratio = (f"{o['tokens_per_s'] / t['tokens_per_s']:>7.2f}x{o['peak_mem_mb'] / t['peak_mem_mb']:>7.2f}x"
                     if "tokens_per_s" in o and "tokens_per_s" in t else "")
            print(f"{p['max_length']:>10,}{p['vocab']:>9,}{cells[0]}{cells[1]}{ratio}")
        print("slopes (log-log):", {k: None if v is None else round(v, 3) for k, v in train["slopes"].items()})
    pre = report.get("preprocess")
    if pre:
        for p in [*pre["points"], pre["long_responses"]]:
            print(f"preprocess {p['name']:<16}{p['seconds']:>8.1f} s{p['peak_rss_mb']:>9,.0f} MiB  "
                  f"({p['input_mb']:,.1f} MB of JSONL)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    # a run of some parts keeps the others' earlier results; each part says when it ran, under what load
    report: dict = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for part, run_part in (("preprocess", preprocess_part), ("train", train_part)):
        if part in args.parts:
            started, load = time.strftime("%Y-%m-%d %H:%M:%S"), list(os.getloadavg())
            report[part] = {"started": started, "loadavg_at_start": load,
                            "settings": {k: str(v) for k, v in vars(args).items()}, **run_part(args),
                            "loadavg_at_end": list(os.getloadavg())}
    for old in ("started", "loadavg_at_start", "settings", "loadavg_at_end"):
        report.pop(old, None)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.results)
    plot(report, args.results.with_suffix(".png"))
    print_tables(report)
    print(f"wrote {args.results} and {args.results.with_suffix('.png')}")
    failed = [p for p in report.get("train", {}).get("points", [])
              if "tokens_per_s" not in p.get("orpo", {"tokens_per_s": 0})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
