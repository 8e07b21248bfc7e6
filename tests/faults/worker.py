"""One `orpo train` process of the fault suite: the real CLI, plus optional hooks set by environment.

FAULT_PAUSE=PHASE[:N]  at the N-th time (default 1) this process reaches PHASE, write PHASE to the file
                       FAULT_MARKER and sleep, so that the driver's SIGKILL lands exactly there:
    cache           inside the data cache write: the train split written, the rest not
    ckpt-state      inside a checkpoint write: model/optimizer state written, RNG/scheduler/state not
    ckpt-manifest   inside a checkpoint write: every file written, the manifest (commit point) not
    ckpt-rotate     inside the deletion of an old checkpoint: its manifest gone, its files not yet
    final-model     inside the final save: weights and tokenizer written in the temporary folder, the
                    model card not
    final-publish   inside the final save: the temporary folder complete, not yet renamed into place
FAULT_FULL_DISK=N      writes under OUTPUT_DIR/checkpoints get N bytes in all, then ENOSPC (a patched
                       writer: used only where no tmpfs can be mounted)

Nothing here changes what training computes; the hooks only wait (or fail a write).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pause_at(phase: str) -> None:
    Path(os.environ["FAULT_MARKER"]).write_text(phase)
    while True:  # the driver kills this process now
        time.sleep(1)


def _arm(phase: str, nth: int) -> None:
    import datasets

    from orpo.train import card
    from orpo.train import checkpoint as ckpt

    seen = {"n": 0, "removing": False}

    def reached() -> None:
        seen["n"] += 1
        if seen["n"] == nth:
            _pause_at(phase)

    def wrap(owner, name, before=None, after=None):
        real = getattr(owner, name)

        @functools.wraps(real)
        def hooked(*args, **kwargs):
            if before is not None and before(*args, **kwargs):
                reached()
            out = real(*args, **kwargs)
            if after is not None and after(*args, **kwargs):
                reached()
            return out

        setattr(owner, name, hooked)

    if phase == "cache":
        wrap(datasets.Dataset, "save_to_disk", after=lambda self, path, *a, **k: str(path).endswith("train"))
    elif phase == "ckpt-state":
        wrap(ckpt, "write_atomic", before=lambda path, data: Path(path).name.startswith("rng_state"))
    elif phase == "ckpt-manifest":
        wrap(ckpt, "write_manifest", before=lambda *a, **k: True)
    elif phase == "ckpt-rotate":
        import shutil

        real_remove = ckpt.remove_checkpoint

        def remove(folder):  # the real function, with a pause between its two halves
            (folder / ckpt.MANIFEST).unlink(missing_ok=True)
            reached()
            shutil.rmtree(folder, ignore_errors=True)

        ckpt.remove_checkpoint = functools.wraps(real_remove)(remove)
    elif phase == "final-model":  # the model card is written after the weights and the tokenizer
        wrap(card, "model_card", before=lambda *a, **k: True)
    elif phase == "final-publish":
        from orpo import disk

        wrap(disk, "publish_dir", before=lambda tmp, final: Path(final).name == "final")
    else:
        raise SystemExit(f"unknown FAULT_PAUSE phase {phase}")


def main() -> int:
    pause = os.environ.get("FAULT_PAUSE")
    if pause:
        phase, _, nth = pause.partition(":")
        _arm(phase, int(nth or 1))
    full = os.environ.get("FAULT_FULL_DISK")
    from orpo.cli import main as orpo_main

    if full:
        from faults.disk import FullDisk

        out = os.environ["FAULT_OUTPUT_DIR"]
        with FullDisk(after_bytes=int(full), match=str(Path(out) / "checkpoints")):
            return orpo_main(sys.argv[1:])
    return orpo_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
