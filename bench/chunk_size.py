"""The chunked LM head's speed by chunk size: forward + backward of the head and the ORPO loss.

For each vocabulary size and chunk size, the time of ``loss(hidden, lm_head.weight)`` forward +
backward on random inputs (~4k target rows, hidden 256, pairs of ``--pair-rows`` rows: chunks
hold whole pairs, so a chunk is a multiple of a pair):

- ``fused``: ``chunked.chunked_loss`` with the ORPO loss of each chunk's pairs (what a training
  step runs: each chunk's gradient computed in the forward, 3 head matmuls per chunk);
- ``recompute``: ``chunked.chunked_token_logps`` then ``orpo.loss.orpo_loss`` (the path before
  it: the backward recomputes each chunk's logits, 4 head matmuls);
- ``full``: the plain ``[rows, vocab]`` logits, then the same loss (once per vocabulary size).

Pick ``forward.default_chunk_size`` from these numbers on a quiet machine (nothing else running):

    .venv/bin/python bench/chunk_size.py                 # CPU, float32
    .venv/bin/python bench/chunk_size.py --device cuda --dtype bfloat16 --out chunk_size.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from orpo.loss import odds_ratio_loss, orpo_loss, pair_logps, token_logps_from_logits  # noqa: E402
from orpo.train.chunked import chunked_loss, chunked_token_logps  # noqa: E402
from orpo.train.forward import pair_chunks  # noqa: E402

BETA = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--rows", type=int, default=4096, help="target rows in all (rounded to whole pairs)")
    p.add_argument("--pair-rows", type=int, default=64, help="rows of one pair (chosen + rejected)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocabs", type=int, nargs="+", default=[8192, 65536])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_inputs(args, vocab: int) -> dict:
    """Hidden states, head weight and targets, rows ordered pair by pair (chosen rows, then rejected)."""
    g = torch.Generator().manual_seed(0)
    pairs = max(1, args.rows // args.pair_rows)
    m, half = pairs * args.pair_rows, args.pair_rows // 2
    dtype = getattr(torch, args.dtype)
    pair = torch.arange(m) // args.pair_rows
    rejected = (torch.arange(m) % args.pair_rows) >= half
    return {
        "hidden": (torch.randn(m, args.hidden, generator=g) * 0.5).to(args.device, dtype),
        "weight": (torch.randn(vocab, args.hidden, generator=g) * args.hidden**-0.5).to(args.device, dtype),
        "targets": torch.randint(0, vocab, (m,), generator=g).to(args.device),
        "segment_ids": torch.where(rejected, pair + pairs, pair).to(args.device),
        "response": torch.ones(m, dtype=torch.bool, device=args.device),
        "pairs": pairs,
        "pair_rows": (args.pair_rows,) * pairs,
    }


def run_fused(x: dict, h: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
    chunks = pair_chunks(x["pair_rows"], chunk)
    seg, resp, b = x["segment_ids"], x["response"], x["pairs"]
    nll_tokens = float(x["pair_rows"][0] // 2 * b)

    def chunk_loss(k: int, logps: torch.Tensor) -> torch.Tensor:
        p0, p1, s, e = chunks[k]
        n, sk = p1 - p0, seg[s:e]
        lp = pair_logps(logps, torch.where(sk >= b, sk - b + n, sk) - p0, resp[s:e], n)
        return lp.nll_sum / nll_tokens + BETA * odds_ratio_loss(lp.chosen, lp.rejected).sum() / b

    bounds = [c[2] for c in chunks] + [h.shape[0]]
    return chunked_loss(h, w, None, x["targets"], bounds, chunk_loss)[0]


def run_recompute(x: dict, h: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
    logps = chunked_token_logps(h, w, None, x["targets"], chunk_size=chunk)
    return orpo_loss(logps, x["segment_ids"], x["response"], x["pairs"], BETA).loss


def run_full(x: dict, h: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
    logits = h @ w.t()
    logps = token_logps_from_logits(logits, x["targets"], torch.arange(h.shape[0], device=h.device))
    return orpo_loss(logps, x["segment_ids"], x["response"], x["pairs"], BETA).loss


def time_one(fn, x: dict, chunk: int, args) -> tuple[float, float]:
    """Median seconds of forward + backward, and the loss (to check the paths agree)."""
    def once() -> float:
        h = x["hidden"].detach().requires_grad_()
        w = x["weight"].detach().requires_grad_()
        loss = fn(x, h, w, chunk)
        loss.backward()
        return float(loss.detach())

    for _ in range(args.warmup):
        once()
    times, loss = [], 0.0
    for _ in range(args.reps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = once()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], loss


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    results = []
    print(f"device {args.device}, {args.dtype}, hidden {args.hidden}, pairs of {args.pair_rows} rows")
    print(f"{'vocab':>7} {'path':>10} {'chunk':>6} {'rows':>6} {'ms':>9} {'loss':>10}")
    for vocab in args.vocabs:
        x = make_inputs(args, vocab)
        rows = x["hidden"].shape[0]
        runs = [("full", 0)] + [(p, c) for c in args.chunk_sizes for p in ("fused", "recompute")]
        for path, chunk in runs:
            fn = {"fused": run_fused, "recompute": run_recompute, "full": run_full}[path]
            seconds, loss = time_one(fn, x, chunk, args)
            results.append({"vocab": vocab, "path": path, "chunk_size": chunk or None, "rows": rows,
                            "hidden": args.hidden, "seconds": seconds, "loss": loss, "device": args.device,
                            "dtype": args.dtype})
            print(f"{vocab:>7} {path:>10} {chunk or '-':>6} {rows:>6} {seconds * 1e3:>9.1f} {loss:>10.5f}")
        del x
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
