"""The prepared GPU check (bench/gpu_check.sh calls this): stages, each in its own process under its
own timeout, logged to $OUT/check.log and summarized in $OUT/check.json.

`--cpu-dry-run` runs every stage with tiny shapes on the CPU; the stages that need CUDA are
recorded as skipped with the reason, after building their command and validating their config.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_check"
PY = sys.executable

# the sync counter: a wrapper that counts CUDA's synchronization warnings during `orpo train`
SYNC_WRAPPER = """
import json, sys, warnings, torch
from orpo.cli import main
count = 0
def show(message, category, *args, **kwargs):
    global count
    if "synchroniz" in str(message):
        count += 1
warnings.simplefilter("always")
warnings.showwarning = show
torch.cuda.set_sync_debug_mode("warn")
rc = main(["train", *sys.argv[2:]])
json.dump({"sync_warnings": count}, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def find_asset(carried: str, shared: str) -> Path | None:
    for p in (CARRY / carried, REPO.parent / "shared" / shared):
        if p.exists():
            return p
    return None


# the whole check's budget, the stages' sum (the lease is 15 minutes, starting and carrying included):
# a stage gets what is left of it at most, and one that starts with under MIN_STAGE_S left is skipped
BUDGET_S = 440
MIN_STAGE_S = 20


class Check:
    def __init__(self, out: Path, dry: bool, budget: float):
        self.out, self.dry = out, dry
        self.budget, self.deadline = budget, time.monotonic() + budget
        self.runs = out / "runs"
        shutil.rmtree(self.runs, ignore_errors=True)
        self.runs.mkdir(parents=True)
        self.log = open(out / "check.log", "a")
        self.results: list[dict] = []
        self.last_output = ""

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def sh(self, cmd: list[str], timeout: float) -> tuple[str, float]:
        """Run CMD in its own process group (torchrun's children die with it on a timeout), within
        what is left of the budget ("skipped" if too little is)."""
        self.say("$ " + " ".join(cmd))
        left = self.deadline - time.monotonic()
        if left < MIN_STAGE_S:
            self.last_output = ""
            return "skipped", 0.0
        timeout = min(timeout, left)
        t0 = time.monotonic()
        # the output goes to its own file first, so the run's closing summary can be read back
        with open(self.out / "last_command.log", "w+") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            f.seek(0)
            self.last_output = f.read()
        self.log.write(self.last_output)
        if rc is None:
            return "timeout", time.monotonic() - t0
        return ("pass" if rc == 0 else f"fail (exit {rc})"), time.monotonic() - t0

    def record(self, stage: str, status: str, seconds: float, **facts) -> dict:
        if status == "skipped":
            facts.setdefault("reason", f"over the check's {self.budget:.0f} s budget")
        if status.startswith("fail ("):
            facts.setdefault("reason", status[5:].strip("()"))
            status = "fail"
        row = {"stage": stage, "status": status, "seconds": round(seconds, 1), **facts}
        self.results.append(row)
        self.say(f"=== {stage}: {status} in {seconds:.1f} s {json.dumps(facts)}")
        json.dump(self.results, open(self.out / "check.json", "w"), indent=1)
        return row


def metrics(run: Path, output: str = "") -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    facts = {"final_loss": train[-1]["loss"], "steps": train[-1]["step"]} if train else {}
    rates = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
    if rates:
        facts["tokens_per_s"] = round(sum(rates) / len(rates), 1)
    # the closing summary's "peak memory    1,234 MiB (CUDA max allocated)"
    found = re.findall(r"peak memory\s+([\d,]+) MiB \(([^)]*)\)", output)
    if found:
        facts["peak_memory_mib"], facts["peak_memory_kind"] = int(found[-1][0].replace(",", "")), found[-1][1]
    return facts


def losses(run: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    args = ap.parse_args()
    dry = args.cpu_dry_run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a CPU dry run takes ~200 s on 2 cores; its budget only stops a runaway
    c = Check(out, dry, float(os.environ.get("GPU_CHECK_BUDGET_S", 900 if dry else BUDGET_S)))
    t_start = time.monotonic()
    stories = find_asset("stories260K", "assets/stories260K/hf")

    steps, every = (6, 2) if dry else (30, 10)
    if dry:  # the quickstart's own 164k model on one thread
        shape = []
        precision = ["train.mixed_precision='no'"]  # quoted: YAML reads a bare no as false
    else:  # a ~25M-parameter Llama, bf16 autocast
        shape = ["model.init.hidden_size=512", "model.init.intermediate_size=1376", "model.init.num_hidden_layers=8",
                 "model.init.num_attention_heads=8", "model.init.num_key_value_heads=8"]
        precision = ["train.mixed_precision=bf16"]
    # constant learning rate: a run resumed with the same max_steps is the same run
    base = ["examples/quickstart.yaml", *shape, *precision, "train.lr_scheduler=constant", "train.warmup_steps=0",
            "train.learning_rate=1e-3", f"train.max_steps={steps}", f"train.save_every={every}",
            "train.save_total_limit=3", f"train.eval_every={steps}", "train.log_every=1"]
    lora = None
    if stories is not None:
        lora = ["examples/quickstart.yaml", "model.init=null", f"model.name_or_path={stories}", "model.tokenizer=null",
                "model.chat_template=chatml", "model.lora={r: 8, alpha: 16, dropout: 0.0}", *precision,
                "train.lr_scheduler=constant", "train.warmup_steps=0", "train.learning_rate=1e-3",
                f"train.max_steps={steps}", f"train.save_every={every}", "train.save_total_limit=3",
                f"train.eval_every={steps}", "train.log_every=1"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "orpo.cli", "train"]
    t_train = 120 if dry else 90

    def validate(cfg: list[str]) -> tuple[str, float]:
        """What a skipped stage can still check here: its config loads and its data tokenizes."""
        return c.sh([PY, "-m", "orpo.cli", "preprocess", *cfg], 120)

    # (1) versions and the GPU
    st, s = c.sh([PY, "-c", "import torch, transformers, accelerate, peft, orpo; print('torch', torch.__version__, "
                  "'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', "
                  "peft.__version__, 'cuda', torch.cuda.is_available())"], 120)
    if not dry:
        st2, s2 = c.sh(["nvidia-smi"], 30)
        st, s = (st if st2 == "pass" else st2), s + s2
    c.record("versions", st, s)

    # (2) the padding-free layouts on CUDA
    if dry:
        c.record("test_layouts_gpu", "skipped", 0, reason="needs CUDA (FlexAttention, CUDA kernels)")
    else:
        st, s = c.sh([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layouts_gpu.py"], 150)
        c.record("test_layouts_gpu", st, s)

    # (3) one process, no engine, the sync counter on
    run = c.runs / "single"
    if dry:
        st, s = c.sh([PY, "-m", "orpo.cli", "train", *base, f"train.output_dir={run}"], t_train)
        c.record("single", st, s, **(metrics(run, c.last_output) if st == "pass" else {}),
                 sync_counter="skipped: torch.cuda.set_sync_debug_mode needs CUDA")
    else:
        wrapper = c.runs / "sync_wrapper.py"
        wrapper.write_text(SYNC_WRAPPER)
        counts = c.runs / "sync.json"
        st, s = c.sh([PY, str(wrapper), str(counts), *base, "train.save_every=null", f"train.output_dir={run}"], 90)
        facts = metrics(run, c.last_output) if st == "pass" else {}
        if counts.exists():
            n = json.loads(counts.read_text())["sync_warnings"]
            facts.update(sync_warnings=n, sync_per_step=round(n / steps, 2))
        c.record("single", st, s, **facts)

    # (4) the engines: N steps with saves, then a resume from the middle checkpoint
    def engine(name: str, cfg: list[str], extra: list[str]) -> None:
        run = c.runs / name
        cmd = [*torchrun, *cfg, *extra, f"train.output_dir={run}"]
        if dry and "zero" in name:
            st, s = validate([*cfg, *extra])
            c.record(name, "skipped", s, reason=f"DeepSpeed ZeRO needs CUDA; config+data check: {st}",
                     command=" ".join(cmd))
            return
        st, s = c.sh(cmd, t_train)
        if st != "pass":
            c.record(name, st, s)
            return
        facts = metrics(run, c.last_output)
        cut = run.parent / f"{name}-resumed"
        shutil.copytree(run, cut)
        shutil.rmtree(cut / "final", ignore_errors=True)
        for later in sorted((cut / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[1:]:
            shutil.rmtree(later)
        st2, s2 = c.sh([*torchrun, *cfg, *extra, f"train.output_dir={cut}", "train.resume=auto"], t_train)
        if st2 == "pass":
            a, b = losses(run), losses(cut)
            worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in range(every + 1, steps + 1))
            facts["resume_max_rel_loss_diff"] = float(f"{worst:.2e}")
            st2 = "pass" if worst < 1e-2 else "fail (resumed losses differ)"
        c.record(name, st2 if st2 != "pass" else st, s + s2, **facts)

    for name, extra in (("fsdp2", ["train.distributed=fsdp2"]),
                        ("fsdp2_cpu_offload", ["train.distributed=fsdp2", "train.cpu_offload=true"]),
                        ("zero2", ["train.distributed=zero2"]), ("zero3", ["train.distributed=zero3"])):
        engine(name, base, extra)
        if lora is None:
            c.record(f"{name}_lora", "skipped", 0, reason="no stories260K (.gpu_check/ or ../shared)")
        else:
            engine(f"{name}_lora", lora, extra)

    # (5) DPO under fsdp2 (reference log-probs from the starting weights)
    run = c.runs / "dpo_fsdp2"
    # orpo.beta=0.1: back to the default, which the quickstart's 1.0 is not (another objective's key)
    st, s = c.sh([*torchrun, *base, "orpo.objective=dpo", "orpo.beta=0.1", "train.save_every=null",
                  "train.distributed=fsdp2", f"train.output_dir={run}"], t_train)
    c.record("dpo_fsdp2", st, s, **(metrics(run, c.last_output) if st == "pass" else {}))

    # (6) greedy completions at eval under fsdp2: it used to hang, hence a short timeout
    run = c.runs / "eval_generate_fsdp2"
    st, s = c.sh([*torchrun, *base, "train.eval_generate=2", "train.eval_generate_max_tokens=16",
                  "train.save_every=null", "train.distributed=fsdp2", f"train.output_dir={run}"], 90 if dry else 60)
    facts = {"reason": "hung: killed at its timeout"} if st == "timeout" else {}
    if st == "pass":
        samples = run / "samples.jsonl"
        facts = {**metrics(run, c.last_output), "samples": len(samples.read_text().splitlines()) if samples.exists() else 0}
    c.record("eval_generate_fsdp2", st, s, **facts)

    # (7) QLoRA: 4-bit base, LoRA, gradient checkpointing, 10 steps
    if lora is None:
        c.record("qlora", "skipped", 0, reason="no stories260K (.gpu_check/ or ../shared)")
    else:
        run = c.runs / "qlora"
        cfg = [*lora, "model.load_in_4bit=true", "model.gradient_checkpointing=true", "train.max_steps=10",
               "train.save_every=null", "train.eval_every=10", f"train.output_dir={run}"]
        if dry:
            st, s = validate(cfg)
            c.record("qlora", "skipped", s, reason=f"bitsandbytes 4-bit needs CUDA; config+data check: {st}",
                     command=" ".join([PY, "-m", "orpo.cli", "train", *cfg]))
        else:
            st, s = c.sh([PY, "-m", "orpo.cli", "train", *cfg], 90)
            c.record("qlora", st, s, **(metrics(run, c.last_output) if st == "pass" else {}))

    total = time.monotonic() - t_start
    failed = [r["stage"] for r in c.results if r["status"] in ("fail", "timeout")]
    c.say(f"total {total:.0f} s; failed or timed out: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
