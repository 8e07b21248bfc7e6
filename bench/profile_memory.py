"""Where orpo's training memory goes in one optimizer step: bench/run.py's ``orpo`` system, phase by phase.

Builds exactly what ``bench/run.py`` trains as its ``orpo`` system (same model, pairs, batch, layout,
config; its own functions) and measures, per setting, in two fresh processes:

1. **rss**: the bench's 10 steps with the RSS (``VmRSS``) and its peak (``VmHWM``, reset at each
   mark) read at the phase boundaries of every step (data, decoder forward, chunked head + loss,
   backward, clip, optimizer step, zero_grad), so the training memory (peak minus the RSS before
   training, as the bench reports it) is split by phase; and the tensors autograd saves for
   backward (``saved_tensors_hooks``), by module type, one storage counted once, of the step
   that saved the most.
2. **profile**: the same run up to the step of the highest RSS peak, that step under
   ``torch.profiler`` (``profile_memory``, ``record_shapes``): the live tensor bytes by category at
   their peak (parameters, gradients, AdamW state, activations, temporaries) and the largest single
   allocations with the op, shapes and orpo frames that made them. The RSS peak of 1. minus the
   live tensors of 2. beyond the parameters = allocator overhead (freed memory glibc keeps in its
   heap and arenas, fragmentation).

Run (a few minutes, CPU, both settings): ``.venv/bin/python bench/profile_memory.py``;
``--settings small-vocab`` for one; ``--json PATH`` also writes the numbers. What-ifs, measured the
same way: ``--env MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns every freed block over 128 KiB at
once, instead of keeping up to 32 MiB blocks in its heap) and ``--env PROFILE_MEMORY_FUSED_ADAMW=1``
(torch's fused AdamW in place of its per-parameter loop), ``--env PROFILE_MEMORY_LSE=1`` (the
chunked head's logsumexp without its ``[chunk, vocab]`` temporary). Those two became orpo's own
defaults on 2026-12-04 (``chunked._logsumexp``, fused AdamW on the CPU): there they change nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import run as bench

MIB = 2**20
PHASES = ("data", "decoder forward", "head + loss", "backward", "clip", "optimizer step", "zero_grad + log")


def vm_status() -> dict[str, int]:
    """VmRSS and VmHWM in bytes, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def category(stack: list[tuple[str, str]]) -> str:
    """The module type a saved tensor belongs to, from the innermost module outward."""
    for name, kind in reversed(stack):
        low = f"{name} {kind}".lower()
        if "norm" in low:
            return "norms (RMSNorm)"
        if "attn" in low or "attention" in low:
            return "attention"
        if "mlp" in low:
            return "MLP"
        if "embed" in low:
            return "embeddings"
        if "rotary" in low:
            return "rotary"
        if "decoderlayer" in low:
            return "decoder layer (residual adds)"
    return "outside modules (chunked LM head, loss)" if not stack else f"other ({stack[-1][1]})"


class Instruments:
    """Phase marks, module stack and saved-tensor accounting hooked onto a set-up Trainer."""

    def __init__(self, trainer):
        import torch

        self.trainer, self.torch = trainer, torch
        self.step, self.marks, self.stack = 0, [], []
        self.saved: dict[int, dict] = {}
        self.best_saved: tuple[int, dict] = (0, {})
        inner = trainer.accelerator.unwrap_model(trainer.model)
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in inner.parameters()}
        self.names = {m: n for n, m in inner.named_modules()}
        self.saving = None
        self.inputs: set[int] = set()
        inner.register_forward_pre_hook(self._model_pre, with_kwargs=True)
        inner.model.register_forward_hook(lambda *_: self.mark("decoder forward"))
        for module in inner.modules():
            module.register_forward_pre_hook(self._push)
            module.register_forward_hook(self._pop)
        engine = trainer.engine
        backward, clip, step = engine.backward, engine.clip_grad_norm_, trainer.optimizer.step

        def traced_backward(loss, grad_accum):
            self.mark("head + loss")
            self._stop_saving()
            backward(loss, grad_accum)
            self.mark("backward")

        def traced_clip(*a, **k):
            out = clip(*a, **k)
            self.mark("clip")
            return out

        def traced_step(*a, **k):
            out = step(*a, **k)
            self.mark("optimizer step")
            return out

        engine.backward, engine.clip_grad_norm_, trainer.optimizer.step = traced_backward, traced_clip, traced_step

    def mark(self, phase: str) -> None:
        vm = vm_status()
        self.marks.append({"step": self.step, "phase": phase, "rss": vm["VmRSS"], "hwm": vm["VmHWM"]})
        bench.reset_rss_peak()

    def end_step(self) -> None:
        self.mark("zero_grad + log")
        total = sum(v["bytes"] for v in self.saved.values())
        if total > self.best_saved[0]:
            self.best_saved = (total, {"step": self.step, "tensors": list(self.saved.values())})
        self.saved, self.step = {}, self.step + 1

    def _model_pre(self, module, args, kwargs):
        if not self.torch.is_grad_enabled():
            return
        self.mark("data")
        self.inputs = {v.untyped_storage().data_ptr() for v in kwargs.values() if isinstance(v, self.torch.Tensor)}
        self.saving = self.torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self.saving.__enter__()

    def _stop_saving(self) -> None:
        if self.saving is not None:
            self.saving.__exit__(None, None, None)
            self.saving = None

    def _push(self, module, _args):
        self.stack.append((self.names.get(module, "?"), type(module).__name__))

    def _pop(self, *_):
        if self.stack:
            self.stack.pop()

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.param_ptrs or ptr in self.saved or storage.nbytes() == 0:
            return t
        cat = "batch inputs (ids, 4D mask)" if ptr in self.inputs else category(self.stack)
        self.saved[ptr] = {"category": cat, "bytes": storage.nbytes(), "shape": list(t.shape),
                           "dtype": str(t.dtype).replace("torch.", ""),
                           "module": self.stack[-1][0] if self.stack else "-"}
        return t


def build(setting: str, max_steps: int):
    """bench/run.py's ``orpo`` system for ``setting``, set up (its run_orpo up to ``trainer.train()``)."""
    from orpo.train import Trainer, load_tokenizer

    args = bench.parse_args(["--device", "cpu", "--settings", setting, "--no-trl",
                             "--warmup", "1", "--steps", str(max_steps - 1)])
    overrides, _ = bench.orpo_systems()["orpo"]
    # its own output folder (orpo_config names it after the system), so a bench run alongside keeps its files
    cfg = bench.orpo_config(args, setting, "orpo-profile-memory", overrides)
    data = bench.FitData(args, cfg, load_tokenizer(cfg.model))
    holder: dict = {}
    trainer = Trainer(cfg, data=data, progress=False, on_step_end=lambda tr: holder["end"](tr)).setup()
    trainer.layout = bench.RecordingLayout(trainer.layout)
    if os.environ.get("PROFILE_MEMORY_FUSED_ADAMW") == "1":
        # what-if: torch's fused AdamW (it has a CPU kernel), no sqrt/div temporaries of each parameter's size
        for group in getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups:
            group.update(fused=True, foreach=False)
    if os.environ.get("PROFILE_MEMORY_LSE") == "1":
        _low_memory_logsumexp()
    return args, trainer, holder


def _low_memory_logsumexp(block: int = 64) -> None:
    """What-if: the chunked head's logsumexp without torch's ``[rows, vocab]`` ``z − max`` temporary.

    Swaps the ``torch`` that orpo.train.chunked sees for one whose logsumexp goes ``block`` rows at a time.
    """
    import types

    import torch

    import orpo.train.chunked as chunked

    def logsumexp(z, dim=-1, out=None):
        m = z.amax(dim)
        res = torch.empty_like(m) if out is None else out
        for a in range(0, z.shape[0], block):
            r = slice(a, a + block)
            torch.add(m[r], (z[r] - m[r, None]).exp_().sum(-1).log_(), out=res[r])
        return res

    proxy = types.ModuleType("torch_proxy")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.logsumexp = logsumexp
    chunked.torch = proxy


def child_rss(setting: str, max_steps: int) -> dict:
    args, trainer, holder = build(setting, max_steps)
    inst = Instruments(trainer)
    holder["end"] = lambda tr: inst.end_step()
    before = bench.rss_now()
    bench.reset_rss_peak()
    inst.marks.append({"step": -1, "phase": "before", "rss": before, "hwm": before})
    trainer.train()
    inst._stop_saving()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                if hasattr(v, "untyped_storage") and v.numel() > 1)
    return {"before": before, "marks": inst.marks, "saved": inst.best_saved[1],
            "param_bytes": sum(p.numel() * p.element_size() for p in params), "adam_bytes": state,
            "work": trainer.layout.work}


def child_profile(setting: str, step: int) -> dict:
    """Steps 1..``step`` of the bench run, the last under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    args, trainer, holder = build(setting, step)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)

    def end(tr):
        if tr.state.step == step - 1:
            prof.start()
        elif tr.state.step == step:
            prof.stop()

    holder["end"] = end
    if step == 1:
        prof.start()
    trainer.train()
    mp = prof._memory_profile()
    times, sizes = MemoryProfileTimeline(mp)._coalesce_timeline("cpu")
    names = ["unknown" if c is None else c.name.lower() for c in _CATEGORY_TO_INDEX]
    totals = [sum(s[1:]) for s in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    at_peak = {names[i]: sizes[peak][i + 1] for i in range(len(names))}
    most = {names[i]: max(s[i + 1] for s in sizes) for i in range(len(names))}
    allocs = []
    for event in mp._op_tree.dfs():
        fields = event.typed[1]
        if event.typed[0].name != "Allocation" or fields.alloc_size < MIB:
            continue
        op, where = event.parent, where_from(event)
        shapes = []
        if op is not None and hasattr(op.typed[1], "inputs"):
            shapes = [list(x.sizes) for x in op.typed[1].inputs if hasattr(x, "sizes") and x.sizes]
        allocs.append({"bytes": fields.alloc_size, "op": op.name if op is not None else "?",
                       "where": where, "input_shapes": shapes[:3]})
    allocs.sort(key=lambda a: -a["bytes"])
    del torch
    return {"live_peak": totals[peak], "at_peak": at_peak, "category_max": most, "allocs": allocs[:15],
            "step": step}


def where_from(event) -> str:
    """The orpo / transformers / torch.optim frames above an allocation (innermost first), and whether in backward."""
    frames, backward, e = [], False, event.parent
    while e is not None:
        name = e.name
        backward = backward or name.startswith("autograd::engine")
        if ".py(" in name and ("orpo/" in name or "transformers/" in name or "torch/optim" in name):
            frames.append(name.rsplit("/", 1)[-1])
        e = e.parent
    return ("backward: " if backward else "") + " < ".join(frames[:3])


def run_child(setting: str, mode: str, value: int, extra_env: dict[str, str]) -> dict:
    env = {**os.environ, **extra_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(bench.ROOT / "src")])),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, __file__, "--child", f"{setting}/{mode}/{value}"], env=env,
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROFILE ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{setting} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[8:])


def phase_table(rss: dict) -> tuple[list[str], int]:
    """Per phase: the peak over steps of (VmHWM during the phase − RSS before training); and the peak step."""
    before, marks = rss["before"], rss["marks"]
    by_phase: dict[str, list[float]] = defaultdict(list)
    by_step: dict[int, float] = defaultdict(float)
    rss_end: dict[str, list[float]] = defaultdict(list)
    for m in marks[1:]:
        by_phase[m["phase"]].append((m["hwm"] - before) / MIB)
        rss_end[m["phase"]].append((m["rss"] - before) / MIB)
        by_step[m["step"]] = max(by_step[m["step"]], (m["hwm"] - before) / MIB)
    peak_step = max(by_step, key=by_step.get)
    lines = [f"  {'phase':<18}{'peak (max/steps)':>17}{'peak @ step ' + str(peak_step + 1):>16}{'RSS at end':>12}"]
    at = {m["phase"]: m for m in marks[1:] if m["step"] == peak_step}
    for phase in PHASES:
        if phase in by_phase:
            lines.append(f"  {phase:<18}{max(by_phase[phase]):>17,.0f}{(at[phase]['hwm'] - before) / MIB:>16,.0f}"
                         f"{(at[phase]['rss'] - before) / MIB:>12,.0f}")
    steps = "  ".join(f"{s + 1}:{v:,.0f}" for s, v in sorted(by_step.items()))
    lines.append(f"  training memory per step (MiB): {steps}")
    return lines, peak_step + 1


def report(setting: str, rss: dict, prof: dict) -> list[str]:
    model = bench.SETTINGS[setting]
    out = [f"== {setting}: vocab {model['vocab_size']:,}, hidden {model['hidden_size']}, "
           f"{model['num_hidden_layers']} layers; MiB"]
    lines, peak_step = phase_table(rss)
    peak = max(m["hwm"] for m in rss["marks"]) - rss["before"]
    out += [f"training memory (peak VmHWM − RSS before, as bench/run.py): {peak / MIB:,.0f} MiB",
            "RSS phase peaks over the bench's 10 steps:", *lines]
    p, a = rss["param_bytes"] / MIB, rss["adam_bytes"] / MIB
    out.append(f"parameters {p:,.1f} (exist before training) | gradients {p:,.1f} | AdamW exp_avg+exp_avg_sq {a:,.1f}")
    saved = rss["saved"]
    cats: dict[str, int] = defaultdict(int)
    for t in saved["tensors"]:
        cats[t["category"]] += t["bytes"]
    out.append(f"saved for backward at step {saved['step'] + 1} (one storage once, parameters excluded): "
               f"{sum(cats.values()) / MIB:,.1f}")
    for c, b in sorted(cats.items(), key=lambda x: -x[1]):
        out.append(f"  {c:<42}{b / MIB:>9,.1f}")
    big = sorted(saved["tensors"], key=lambda t: -t["bytes"])[:8]
    out.append("  largest saved: " + "; ".join(f"{t['module']} {t['shape']} {t['dtype']} {t['bytes'] / MIB:.1f}"
                                               for t in big))
    out.append(f"torch.profiler, step {prof['step']}: live tensors at their peak {prof['live_peak'] / MIB:,.1f}")
    for c, b in sorted(prof["at_peak"].items(), key=lambda x: -x[1]):
        if b:
            out.append(f"  {c:<18}{b / MIB:>9,.1f}   (its own max in the step {prof['category_max'][c] / MIB:,.1f})")
    live = prof["live_peak"] - rss["param_bytes"]
    out.append(f"allocator/RSS overhead at the peak step: {peak / MIB:,.0f} RSS − {live / MIB:,.0f} live tensors "
               f"beyond the parameters = {(peak - live) / MIB:,.0f} (freed memory glibc keeps, fragmentation)")
    work = rss["work"][peak_step - 1]
    logits = work["all"] * model["vocab_size"] * 4
    out.append(f"TRL, same step: [2B, T, V] = {work['all']:,} padded positions x {model['vocab_size']:,} float32 logits "
               f"= {logits / MIB:,.0f} per copy (logits, log-softmax, their grads: several copies live at once)")
    out.append("largest single allocations (MiB, op, its input shapes <- the frames that called it):")
    for x in prof["allocs"][:12]:
        out.append(f"  {x['bytes'] / MIB:>7.1f}  {x['op']} {x['input_shapes']} <- {x['where']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["small-vocab", "large-vocab"], choices=list(bench.SETTINGS))
    p.add_argument("--profile-step", type=int, default=None, help="default: the step of the highest RSS peak")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra environment of the children, e.g. MALLOC_MMAP_THRESHOLD_=131072 (glibc)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        setting, mode, value = args.child.split("/")
        out = child_rss(setting, int(value)) if mode == "rss" else child_profile(setting, int(value))
        print("PROFILE " + json.dumps(out))
        return 0
    steps = 10  # bench/run.py's --warmup 2 + --steps 8
    results = {}
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    for setting in args.settings:
        rss = run_child(setting, "rss", steps, extra_env)
        _, peak_step = phase_table(rss)
        prof = run_child(setting, "profile", args.profile_step or peak_step, extra_env)
        results[setting] = {"rss": rss, "profile": prof}
        print("\n".join(report(setting, rss, prof)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
