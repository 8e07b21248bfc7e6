"""The ORPO loss alone, from final hidden states: orpo's chunked log-probs vs Liger-Kernel vs plain torch.

Forward + backward time and peak memory of ``loss(hidden, lm_head.weight)`` on random inputs of a
real shape (default: Qwen2.5-0.5B's head, 8 pairs of 1,024 tokens, bf16), with the NLL on the whole
chosen sequence (TRL's and Liger's default) and the odds ratio on the responses:

- ``orpo-chunked``: ``orpo.train.chunked.chunked_token_logps`` on the positions the loss reads,
  then ``orpo.loss.orpo_loss`` (what a training step runs), for several chunk sizes;
- ``liger``: ``LigerFusedLinearORPOLoss`` (liger-kernel; torch.compile'd on CUDA, as its default);
- ``torch-full``: ``hidden @ W.T`` for every read position, then the same ``orpo_loss``.

All three compute the same loss (checked); the memory is the peak over a forward + backward minus
what was allocated before it (the inputs and the weight). Run by bench/gpu.sh; ``--tiny`` for a
CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from orpo.loss import orpo_loss, token_logps_from_logits  # noqa: E402
from orpo.train.chunked import chunked_token_logps  # noqa: E402
from orpo.train.forward import default_chunk_size  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens of each sequence")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk-sizes", type=int, nargs="*", default=[256, 1024, 4096],
                   help="orpo chunk sizes besides the default")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (Liger compiles in these)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for a dry run on the CPU")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.pairs, args.seq, args.prompt, args.hidden, args.vocab = 2, 48, 12, 32, 1000
        args.chunk_sizes, args.reps, args.warmup = [17], 2, 1
    return args


def inputs(args):
    g = torch.Generator(device="cpu").manual_seed(0)
    n, t, dtype = 2 * args.pairs, args.seq, getattr(torch, args.dtype)
    hidden = (torch.randn(n, t, args.hidden, generator=g) * 0.5).to(args.device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5).to(args.device, dtype)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (n, t), generator=g).to(args.device)
    return hidden, weight, targets


def orpo_side(args, hidden, weight, targets, chunk: int | None):
    """What a training step runs: gather the read positions, chunked (or full) log-probs, orpo_loss."""
    b, t = args.pairs, args.seq
    pos = torch.arange(t, device=hidden.device)
    is_chosen = torch.arange(2 * b, device=hidden.device)[:, None] < b
    response = (pos >= args.prompt)[None, :].expand(2 * b, t)
    read = is_chosen | response  # NLL on the whole chosen sequence, odds ratio on the responses
    segment_ids = torch.arange(2 * b, device=hidden.device)[:, None].expand(2 * b, t)[read]
    h, y = hidden[read], targets[read]
    if chunk is None:
        logps = token_logps_from_logits(h @ weight.t(), y)
    else:
        logps = chunked_token_logps(h, weight, None, y, chunk_size=chunk)
    return orpo_loss(logps, segment_ids, response[read], b, beta=0.1, nll_on_prompt=True).loss


def liger_side(args, hidden, weight, targets, loss_fn):
    or_targets = targets.clone()
    or_targets[:, : args.prompt] = -100  # the odds ratio on the responses; the NLL (nll_target) on everything
    out = loss_fn(weight, hidden, or_targets, nll_target=targets)
    return out[0] if isinstance(out, tuple) else out


def measure(args, fn, hidden, weight) -> dict:
    cuda = args.device == "cuda"
    times, peaks, loss = [], [], None
    for i in range(args.warmup + args.reps):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated() - before)
    out = {"ms": 1000 * sorted(times)[len(times) // 2], "ms_min": 1000 * min(times), "loss": float(loss.detach())}
    if peaks:
        out["peak_mem_mb"] = max(peaks) / 2**20
    return out


def attempt(args, fn, hidden, weight) -> dict:
    try:
        return measure(args, fn, hidden, weight)
    except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. torch-full out of memory, a compile error
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def main(argv=None) -> int:
    args = parse_args(argv)
    hidden, weight, targets = inputs(args)
    default = default_chunk_size(args.vocab, args.device)
    runs = {f"orpo-chunked-{c}" + (" (default)" if c == default else ""): (lambda c=c: orpo_side(
        args, hidden, weight, targets, c)) for c in dict.fromkeys([default, *args.chunk_sizes])}
    runs["torch-full"] = lambda: orpo_side(args, hidden, weight, targets, None)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

        liger = LigerFusedLinearORPOLoss(ignore_index=-100, beta=0.1, compiled=args.device == "cuda")
        runs["liger"] = lambda: liger_side(args, hidden, weight, targets, liger)
    except ImportError as e:
        print(f"liger-kernel not importable ({e}): Liger is not measured")
    results = {}
    for name, fn in runs.items():
        results[name] = attempt(args, fn, hidden, weight)
        if name == "liger" and "error" in results[name] and args.device == "cuda":
            # torch.compile failed on this machine: Liger's eager path is still its algorithm
            eager = partial(liger_side, args, hidden, weight, targets,
                            LigerFusedLinearORPOLoss(ignore_index=-100, beta=0.1, compiled=False))
            name = "liger-eager"
            results[name] = attempt(args, eager, hidden, weight)
        r = results[name]
        print(f"{name:<28}" + (f"{r['ms']:>9.1f} ms  {r.get('peak_mem_mb', float('nan')):>9,.0f} MiB  loss {r['loss']:.6f}"
                               if "ms" in r else f"  {r['error']}"), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    losses = [r["loss"] for r in results.values() if "loss" in r]
    tol = 1e-2 if args.dtype == "bfloat16" else 1e-4
    agree = max(losses) - min(losses) <= tol * abs(losses[0]) if losses else False
    print(f"losses agree to {tol:g} relative: {agree}")
    shape = {k: getattr(args, k) for k in ("device", "dtype", "pairs", "seq", "prompt", "hidden", "vocab")}
    if args.device == "cuda":
        shape["gpu"] = torch.cuda.get_device_name()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"shape": shape, "results": results, "losses_agree": agree}, indent=1) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
