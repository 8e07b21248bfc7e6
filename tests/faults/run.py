"""The fault suite (`make faults`): a run that is killed, stopped, damaged and starved of disk space must
end with exactly the weights of a run that was not.

On the stories260K model and the HH pairs of ../shared, fp32 on the CPU, one thread per process:

1. an uninterrupted reference run;
2. the same run, one `orpo train` process after another (each with ``train.resume: auto``, as a
   restart loop would), each hit by one fault:
   - SIGKILL at a seeded random instant: any time after the process started (imports, set-up, the
     resume) or a random moment of a random training step;
   - SIGKILL inside a write (``worker.py`` pauses the process there and says so): the data cache,
     a checkpoint (state written; every file but the manifest; deleting an old one), the final save
     (weights written; the folder complete, not yet renamed);
   - SIGTERM at a random moment of a random step: exit status 4, a checkpoint at the step it
     stopped at;
   - a damaged checkpoint: 64 bytes in the middle of the newest checkpoint's largest file overwritten
     before a restart, which must name it and resume from the one before;
   - a full disk: the checkpoints folder on a small tmpfs (``unshare``, no root needed where user
     namespaces are allowed; else a patched writer): exit status 5, the previous checkpoint intact;
3. a last restart that finishes, then: the largest absolute difference between its final weights and
   the reference's (must be exactly 0.0), and whether every metrics row (train and eval) is equal.

After every process the output folder is checked: every checkpoint is complete, or unfinished with no
manifest (a killed save), or one this suite damaged; ``final/`` is absent or complete; no data cache
entry is half-written. It prints a summary and writes ``OUT/faults.json``; logs of every process are
in ``OUT/logs/``.

    python tests/faults/run.py [--out runs/faults] [--seed 0] [--short]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ORPO_SHARED", REPO.parent / "shared"))
WORKER = Path(__file__).resolve().parent / "worker.py"

CKPT_PHASES = ("ckpt-state", "ckpt-manifest", "ckpt-rotate")
FINAL_PHASES = ("final-model", "final-publish")


def suite_config(out: Path, cache: Path, short: bool) -> dict:
    model = SHARED / "assets" / "stories260K" / "hf"
    data = SHARED / "data" / "hh-rlhf" / "harmless-dev.jsonl.gz"
    if short:
        return {"model": {"name_or_path": str(model)},
                "data": {"train": str(data), "max_length": 64, "max_samples": 48, "cache_dir": str(cache)},
                "train": {"output_dir": str(out), "max_steps": 12, "batch_size": 4, "learning_rate": 1e-3,
                          "save_every": 2, "resume": "auto"}}
    return {"model": {"name_or_path": str(model)},
            "data": {"train": str(data), "max_length": 128, "max_samples": 200, "eval_fraction": 0.1,
                     "cache_dir": str(cache)},
            "train": {"output_dir": str(out), "max_steps": 60, "batch_size": 4, "learning_rate": 1e-3,
                      "save_every": 2, "eval_every": 20, "resume": "auto"}}


@dataclass
class Event:
    """One process of the faulted run and the fault that hits it."""

    kind: str  # kill-anytime | kill-step | kill-phase | sigterm | full-disk | finish
    phase: str | None = None  # kill-phase: where (worker.py FAULT_PAUSE)
    nth: int = 1  # kill-phase: at the nth time the process gets there
    damage_first: bool = False  # damage the newest checkpoint before this process starts


@dataclass
class Proc:
    """A running `orpo train` process and its log (stdout and stderr)."""

    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@dataclass
class Record:
    """What happened to one process."""

    index: int
    kind: str
    returncode: int | None = None
    signal_sent: str | None = None
    landed: str | None = None  # where a signal landed: a write phase, "after step N" (logged), "in set-up"
    start_step: int | None = None  # where it resumed (0: fresh); None: killed before it decided
    reached_step: int = 0  # the last step it logged
    seconds: float = 0.0
    damaged: str | None = None  # the checkpoint file this suite damaged before it started
    damage_reported: bool = False
    message: str | None = None  # its last stderr line when it exited on its own
    problems: list[str] = field(default_factory=list)


def plan(rng: random.Random, kills: int, sigterms: int, damaged: int, full_disk: int, short: bool) -> list[Event]:
    """The order of faults: a cache kill first, the final-save kills last, the rest shuffled."""
    if short:  # the damage waits for two complete checkpoints: the restart must fall back to the older one
        return [Event("kill-step"), Event("kill-phase", "ckpt-manifest", nth=2), Event("sigterm"),
                Event("kill-phase", "final-publish", damage_first=True), Event("finish")]
    phases = ["ckpt-state", "ckpt-state", "ckpt-manifest", "ckpt-manifest", "ckpt-rotate"]
    middle = [Event("kill-phase", p, nth=rng.randint(1, 2)) for p in phases]
    random_kills = kills - 1 - len(phases) - len(FINAL_PHASES)
    anytime = max(1, random_kills // 4)
    middle += [Event("kill-anytime") for _ in range(anytime)] + [Event("kill-step") for _ in range(random_kills - anytime)]
    middle += [Event("sigterm") for _ in range(sigterms)] + [Event("full-disk") for _ in range(full_disk)]
    rng.shuffle(middle)
    for e in rng.sample([e for e in middle[len(middle) // 4:] if e.kind in ("kill-step", "sigterm", "kill-phase")],
                        damaged):
        e.damage_first = True
    return [Event("kill-phase", "cache"), *middle, *(Event("kill-phase", p) for p in FINAL_PHASES), Event("finish")]


class FaultSuite:
    def __init__(self, root: Path, seed: int = 0, short: bool = False, kills: int = 20, sigterms: int = 3,
                 damaged: int = 2, full_disk: int = 1, log=partial(print, flush=True), in_process: bool = False):
        self.root, self.seed, self.short, self.log, self.in_process = root, seed, short, log, in_process
        self.rng = random.Random(seed)
        self.events = plan(self.rng, kills, sigterms, damaged, full_disk, short)
        self.out = root / "run"
        self.cache = root / "cache"
        self.logs = root / "logs"
        self.config = suite_config(self.out, self.cache, short)
        self.max_steps = self.config["train"]["max_steps"]
        self.damaged_files: set[Path] = set()
        self.step_s, self.setup_s = 0.2, 8.0  # measured by reference()
        self.full_disk_info: dict = {}
        self.damage_due = 0  # damage asked for, waiting for two complete checkpoints

    # -- processes ------------------------------------------------------------------------------

    def _env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "FAULT_OUTPUT_DIR": str(self.out),
               "FAULT_MARKER": str(self.root / "paused")}
        env.update(extra)
        return env

    def _start(self, name: str, config: Path, env: dict[str, str], prefix: tuple[str, ...] = ()) -> Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen([*prefix, sys.executable, str(WORKER), "train", str(config)], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return Proc(popen, log)

    def _write_config(self, name: str, cfg: dict) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def reference(self) -> Path:
        """The uninterrupted run (its own output folder). It builds the data cache that the faulted
        run's first process will find missing again (the cache is cleared after it), and it times a
        step and the start-up, so that random instants fall where the work is. ``in_process``: in
        this process (which must run torch on one thread, as the workers do), to save a start-up."""
        cfg = json.loads(json.dumps(self.config))
        cfg["train"]["output_dir"] = str(self.root / "reference")
        started = time.monotonic()
        if self.in_process:
            from orpo.config import load_config
            from orpo.train import train

            train_s = train(load_config(raw=cfg), progress=False).time_s
        else:
            proc = self._start("00-reference", self._write_config("reference", cfg), self._env())
            if proc.wait() != 0:
                raise RuntimeError(f"the reference run failed: see {proc.log}")
            m = re.search(r"^time\s+([\d.]+) s", proc.text(), re.M)
            train_s = float(m.group(1)) if m else (time.monotonic() - started) / 2
        self.step_s, self.setup_s = train_s / self.max_steps, max(1.0, time.monotonic() - started - train_s)
        shutil.rmtree(self.cache)
        return self.root / "reference"

    # -- what the driver reads -------------------------------------------------------------------

    def _train_steps(self) -> list[int]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        steps = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being appended
            if "loss" in row:
                steps.append(row["step"])
        return steps

    @staticmethod
    def _started_training(text: str) -> int | None:
        m = re.search(r"^training \d+ steps .* \(from step (\d+)\)$", text, re.M)
        return int(m.group(1)) if m else None

    def _complete(self) -> list[Path]:
        from orpo.train import checkpoint as ckpt

        return [f for f in ckpt.step_folders(self.out) if ckpt.inspect_checkpoint(f).complete]

    def _newest_complete(self) -> Path | None:
        complete = self._complete()
        return complete[-1] if complete else None

    # -- one faulted process ---------------------------------------------------------------------

    def run_event(self, index: int, event: Event, events_left: int = 1) -> Record:
        rec = Record(index=index, kind=event.kind if event.kind != "kill-phase" else f"kill-{event.phase}")
        self.damage_due += int(event.damage_first)
        if self.damage_due and len(self._complete()) >= 2 and event.kind != "kill-anytime":
            rec.damaged = str(self.damage())
            self.damage_due -= 1
        marker = self.root / "paused"
        marker.unlink(missing_ok=True)
        newest = self._newest_complete()
        resume_step = int(newest.name.removeprefix("step-")) if newest else 0
        env = self._env()
        prefix: tuple[str, ...] = ()
        if event.kind == "kill-phase":
            env["FAULT_PAUSE"] = f"{event.phase}:{event.nth}"
        if event.kind == "full-disk":
            prefix, env = self._full_disk(env)
        started = time.monotonic()
        proc = self._start(f"{index:02d}-{rec.kind}", self._write_config("run", self.config), env, prefix)

        def step_reached(step: int) -> bool:  # this process is training and has logged `step`
            return (self._started_training(proc.text()) is not None
                    and max(self._train_steps(), default=0) >= step)

        def until(cond, timeout: float = 600) -> None:
            deadline = time.monotonic() + timeout
            while proc.popen.poll() is None and time.monotonic() < deadline and not cond():
                time.sleep(0.01)

        if event.kind == "kill-anytime":  # imports, set-up, the resume, the first steps
            until(lambda: False, timeout=self.rng.uniform(0.0, self.setup_s + 3 * self.step_s))
            self._signal(proc, rec, signal.SIGKILL, resume_step)
        elif event.kind in ("kill-step", "sigterm"):  # a random moment of a random step
            # at most 3 steps on, fewer when the faults left would otherwise find the run finished
            span = max(1, min(3, (self.max_steps - resume_step - 2) // max(1, events_left)))
            target = min(resume_step + self.rng.randint(1, span), self.max_steps - 1)
            until(lambda: step_reached(target))
            time.sleep(self.rng.uniform(0.0, self.step_s))
            self._signal(proc, rec, signal.SIGKILL if event.kind == "kill-step" else signal.SIGTERM, resume_step)
        elif event.kind == "kill-phase":  # paused inside the write: kill it there
            limit = resume_step + 6 if event.phase in CKPT_PHASES else self.max_steps + 1
            until(lambda: marker.exists() or step_reached(limit))
            self._signal(proc, rec, signal.SIGKILL, resume_step)
            rec.landed = marker.read_text() if marker.exists() else f"missed {event.phase} ({rec.landed})"
        elif event.kind == "full-disk":  # its first save must fail; if it does not, stop it (a problem)
            until(lambda: step_reached(resume_step + 6))
            self._signal(proc, rec, signal.SIGKILL, resume_step)
        rec.returncode = proc.wait()
        rec.seconds = round(time.monotonic() - started, 2)
        if event.kind == "full-disk":
            shutil.rmtree(self.root / "tmpfs", ignore_errors=True)
        text = proc.text()
        rec.start_step = self._started_training(text)
        if rec.start_step is not None:
            rec.reached_step = max(self._train_steps(), default=rec.start_step)
        if rec.damaged is not None:
            folder = Path(rec.damaged).parents[1] if Path(rec.damaged).parent.name == "state" else Path(rec.damaged).parent
            rec.damage_reported = f"checkpoint {folder} is damaged" in text
        if rec.signal_sent != "SIGKILL":
            lines = [line for line in text.splitlines() if line.startswith("orpo train:")]
            rec.message = lines[-1] if lines else None
        rec.problems = self.check_invariants(event, rec)
        return rec

    def _signal(self, proc: Proc, rec: Record, sig: signal.Signals, resume_step: int) -> None:
        """Send ``sig`` (if the process still runs) and note where it landed: set-up or which step."""
        if proc.popen.poll() is not None:
            return
        training = self._started_training(proc.text()) is not None
        proc.popen.send_signal(sig)
        rec.signal_sent = sig.name
        rec.landed = f"after step {max(self._train_steps(), default=resume_step)}" if training else "in set-up"

    # -- faults ----------------------------------------------------------------------------------

    def damage(self) -> Path:
        """Overwrite 64 bytes in the middle of the newest complete checkpoint's largest file."""
        newest = self._newest_complete()
        assert newest is not None, "no checkpoint to damage"
        largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(largest.read_bytes())
        at = len(data) // 2
        noise = bytes(b ^ 0xFF for b in data[at : at + 64])  # every byte changes
        data[at : at + 64] = noise
        largest.write_bytes(bytes(data))
        self.damaged_files.add(largest)
        return largest

    def _full_disk(self, env: dict[str, str]) -> tuple[tuple[str, ...], dict[str, str]]:
        """A tmpfs over OUTPUT_DIR/checkpoints that holds the complete checkpoints and half of one more,
        if one can be mounted (in a user namespace); else the patched writer, with half a checkpoint.
        Unfinished folders of killed saves are deleted first, as the next save's rotation would: left
        in place they would be deleted by that save and free the room it needs."""
        from orpo.train import checkpoint as ckpt

        root = ckpt.checkpoint_root(self.out)
        root.mkdir(parents=True, exist_ok=True)
        for folder in ckpt.step_folders(self.out):
            if not (folder / ckpt.MANIFEST).is_file():
                ckpt.remove_checkpoint(folder)
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())
        newest = self._newest_complete()
        one = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file()) if newest else 1 << 20
        budget = used + one // 2
        self.full_disk_info = {"budget_bytes": budget, "checkpoint_bytes": one}
        if self._tmpfs_works():
            stage = self.root / "tmpfs"
            stage.mkdir(exist_ok=True)
            script = (f"set -e; mount -t tmpfs -o size={budget} tmpfs {stage}; cp -a {root}/. {stage}/; "
                      f"mount --bind {stage} {root}; set +e; \"$@\"; rc=$?; set -e; umount {root}; "
                      f"rm -rf {root}; mkdir {root}; cp -a {stage}/. {root}/; exit $rc")
            self.full_disk_info["method"] = "tmpfs"
            return ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"), env
        self.full_disk_info["method"] = "patched writer"
        return (), {**env, "FAULT_FULL_DISK": str(one // 2)}

    def _tmpfs_works(self) -> bool:
        probe = self.root / "tmpfs-probe"
        probe.mkdir(exist_ok=True)
        try:
            ok = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                 f"mount -t tmpfs -o size=65536 tmpfs {probe}"], capture_output=True).returncode == 0
        except OSError:
            ok = False
        probe.rmdir()
        return ok

    # -- checks ----------------------------------------------------------------------------------

    def check_invariants(self, event: Event, rec: Record) -> list[str]:
        from orpo.train import checkpoint as ckpt

        problems = []
        for folder in ckpt.step_folders(self.out):
            status = ckpt.inspect_checkpoint(folder)
            if status.state == "damaged" and not any(f.is_relative_to(folder) for f in self.damaged_files):
                problems.append(f"{folder.name} is damaged and this suite did not damage it: {status.problem}")
        final = self.out / "final"
        if final.exists() and not all((final / f).is_file() for f in ("model.safetensors", "tokenizer.json",
                                                                       "README.md", "config.json")):
            problems.append(f"{final} exists but is incomplete: {sorted(p.name for p in final.iterdir())}")
        if self.cache.is_dir():
            for entry in self.cache.iterdir():
                if entry.name.startswith("."):
                    continue  # a killed write's temporary folder: never read
                if not ((entry / "summary.json").is_file() and (entry / "train.arrow").is_file()):
                    problems.append(f"data cache entry {entry.name} is half-written")
        if event.kind == "sigterm" and rec.returncode != 4:
            problems.append(f"SIGTERM: exit status {rec.returncode}, not 4")
        if event.kind == "sigterm" and rec.returncode == 4:
            m = re.search(r"stopped at step (\d+) of \d+: SIGTERM received; resume with train.resume=auto \(from (.+)\)",
                          rec.message or "")
            if not m or not ckpt.inspect_checkpoint(Path(m.group(2))).complete or Path(m.group(2)).name != f"step-{m.group(1)}":
                problems.append(f"SIGTERM: no complete checkpoint at the step it stopped at ({rec.message})")
        if event.kind == "full-disk":
            if rec.returncode != 5 or "No space left on device" not in (rec.message or "") or "MiB are free" not in (
                    rec.message or ""):
                problems.append(f"full disk: exit status {rec.returncode}, message {rec.message!r}")
            if any(not (f / ckpt.MANIFEST).is_file() for f in ckpt.step_folders(self.out)):
                problems.append("full disk: an unfinished checkpoint folder was left behind")
        if event.kind.startswith("kill") and rec.signal_sent is None:
            problems.append(f"it exited on its own with status {rec.returncode} before the kill")
        if event.kind == "finish" and rec.returncode != 0:
            problems.append(f"the last restart failed with status {rec.returncode}")
        if rec.damaged is not None and not rec.damage_reported and rec.start_step is not None:
            problems.append(f"the damaged {rec.damaged} was not reported at resume")
        return problems

    # -- the whole suite -------------------------------------------------------------------------

    def run(self) -> dict:
        started = time.monotonic()
        load_before = os.getloadavg()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        reference = self.reference()
        self.log(f"reference: {self.max_steps} steps, {self.step_s:.3f} s a step, {self.setup_s:.1f} s of start-up; "
                 f"then {len(self.events)} processes with faults")
        records = []
        for i, event in enumerate(self.events, start=1):
            rec = self.run_event(i, event, events_left=sum(e.kind != "finish" for e in self.events[i:]))
            records.append(rec)
            self.log(f"{i:>3} {rec.kind:<20} {rec.signal_sent or '-':<8} landed {rec.landed or '-':<26} "
                     f"status {rec.returncode!s:<4} steps {rec.start_step}->{rec.reached_step}"
                     + (f"  damaged {Path(rec.damaged).name}: {'reported' if rec.damage_reported else 'NOT REPORTED'}"
                        if rec.damaged else "")
                     + (f"  PROBLEMS {rec.problems}" if rec.problems else ""))
        result = self.summary(records, reference, time.monotonic() - started)
        result["load_before"], result["load_after"] = [round(x, 2) for x in load_before], [
            round(x, 2) for x in os.getloadavg()]
        (self.root / "faults.json").write_text(json.dumps(result, indent=1))
        return result

    def summary(self, records: list[Record], reference: Path, elapsed: float) -> dict:
        from safetensors.torch import load_file

        from orpo.train import read_metrics

        final = self.out / "final" / "model.safetensors"
        max_diff = None
        if final.is_file():
            a, b = load_file(str(final)), load_file(str(reference / "final" / "model.safetensors"))
            max_diff = (max((a[k].double() - b[k].double()).abs().max().item() for k in b)
                        if a.keys() == b.keys() else float("inf"))

        def rows(run: Path) -> list[dict]:
            return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]

        metrics_identical = final.is_file() and rows(self.out) == rows(reference)
        executed = sum(max(0, r.reached_step - r.start_step) for r in records if r.start_step is not None)
        kills = [r for r in records if r.signal_sent == "SIGKILL"]
        sigterms = [r for r in records if r.signal_sent == "SIGTERM"]
        full = [r for r in records if r.kind == "full-disk"]
        return {
            "kills": len(kills),
            "kills_by_where": _count(_where(r.landed) for r in kills),
            "sigterms": len(sigterms),
            "sigterm_exit_4_with_checkpoint": sum(1 for r in sigterms if r.returncode == 4 and not r.problems),
            "damaged_checkpoints": sum(1 for r in records if r.damaged),
            "damaged_detected": sum(1 for r in records if r.damaged and r.damage_reported),
            "full_disk": len(full),
            "full_disk_exit_5": sum(1 for r in full if r.returncode == 5 and not r.problems),
            "full_disk_method": self.full_disk_info.get("method"),
            "full_disk_message": full[0].message if full else None,
            "processes": len(records),
            "resumes": sum(1 for r in records if r.start_step),
            "steps": self.max_steps,
            "steps_executed": executed,
            "steps_recomputed": executed - self.max_steps,
            "max_abs_diff": max_diff,
            "metrics_identical": metrics_identical,
            "problems": [f"process {r.index} ({r.kind}): {p}" for r in records for p in r.problems],
            "seed": self.seed,
            "short": self.short,
            "elapsed_s": round(elapsed, 1),
            "step_s": round(self.step_s, 4),
            "config": self.config,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": _torch_version()},
            "records": [asdict(r) for r in records],
        }


def _where(landed: str | None) -> str:
    """A kill's place, for the counts: a write phase, a training step, or set-up."""
    if landed in ("cache", *CKPT_PHASES, *FINAL_PHASES):
        return f"inside write: {landed}"
    return "during training" if landed and "after step" in landed else "during set-up"


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "faults"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--short", action="store_true", help="3 kills, 1 SIGTERM, 1 damaged checkpoint (the test's variant)")
    args = p.parse_args(argv)
    suite = FaultSuite(Path(args.out), seed=args.seed, short=args.short)
    result = suite.run()
    printed = {k: v for k, v in result.items() if k not in ("records", "config")}
    print(json.dumps(printed, indent=1))
    print(f"written: {Path(args.out) / 'faults.json'}")
    ok = result["max_abs_diff"] == 0.0 and not result["problems"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
