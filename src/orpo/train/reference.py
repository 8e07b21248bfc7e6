"""Reference log-probs for DPO with one model in memory: one pass of the starting weights, cached.

DPO compares the policy with a frozen reference. Keeping a second model in memory doubles the
weights; instead, before training (and before a resume loads a checkpoint) the starting weights
score every pair once, and the per-pair summed response log-probs become dataset columns
(``objective.REFERENCE_COLUMNS``) that ride in each batch (``PreferenceBatch.pair_values``).

The values are cached beside the tokenized data (``PreparedData.cache_path``) under a key of the
data fingerprint, a hash of the starting weights' bytes and the mixed precision. Why the bytes
and not the model's name and revision: a local folder can change in place, ``model.init`` builds
weights from a seed, and LoRA wraps them; hashing the tensors is right in every case, and costs
one read of the weights (seconds for billions of parameters) against a full pass over the data.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from orpo.data.collate import Layout
from orpo.disk import atomic_dir

REFERENCE_VERSION = 1  # bump when the way reference log-probs are computed changes
_FILE = "logps.safetensors"


def weights_fingerprint(model) -> str:
    """sha256 of every tensor of the model's state (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # bytes through uint8: numpy has no bfloat16
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_sums(model, dataset, layout: Layout, objective: Any, batch_size: int, accelerator=None,
                   keep_mode: str | None = None) -> dict[str, torch.Tensor]:
    """Summed response log-probs of every pair of ``dataset`` under ``model``: ``{column: [N] float32}``.

    Batches are dealt out over processes (batch ``k`` on rank ``k mod world``) and summed, so
    every rank gets all values. Every rank runs the same number of forwards (a rank short of a
    batch in the last round repeats one and discards it), as a sharded model needs. ``model`` is
    the prepared one (wrapped or sharded, on ``accelerator.device``). In eval mode (no dropout)
    under the run's autocast.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    names = objective.reference_columns
    out = torch.zeros(len(names), len(dataset), dtype=torch.float32, device=device)
    starts = list(range(0, len(dataset), batch_size))
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    try:
        with autocast:
            for k in range(rank, world * math.ceil(len(starts) / world), world):
                start = starts[k] if k < len(starts) else starts[rank % len(starts)]
                rows = dataset[start : start + batch_size]
                rows = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
                batch = objective.prepare(layout(rows), keep_mode).to(device)
                lp = objective.pair_logps(model, batch)
                if k < len(starts):
                    out[:, start : start + len(rows)] = torch.stack([lp.chosen_sum, lp.rejected_sum]).float()
    finally:
        model.train(was_training)
    if world > 1:
        out = accelerator.reduce(out, reduction="sum")
    return {name: out[i].cpu() for i, name in enumerate(names)}


def add_reference_logps(model, splits: dict[str, Any], layout: Layout, objective: Any, batch_size: int,
                        accelerator=None, keep_mode: str | None = None, cache_dir: Path | None = None,
                        data_fingerprint: str = "", console=None, weights_key: str | None = None) -> dict[str, Any]:
    """Each dataset of ``splits`` (None allowed) with the reference columns added; cached in ``cache_dir``.

    Call with the starting weights, before a checkpoint is loaded. Every rank must call it.
    ``weights_key``: their ``weights_fingerprint``, taken before the engine sharded them (default:
    of ``model`` now).
    """
    folder = None
    if cache_dir is not None:
        precision = accelerator.mixed_precision if accelerator is not None else "no"
        key = hashlib.sha256(json.dumps({"version": REFERENCE_VERSION, "weights": weights_key or weights_fingerprint(model),
                                         "precision": precision, "data": data_fingerprint}).encode())
        folder = Path(cache_dir) / f"reference-{key.hexdigest()[:24]}"
    expected = {f"{split}/{col}": len(ds) for split, ds in splits.items() if ds is not None
                for col in objective.reference_columns}
    values = _load(folder, expected, accelerator)
    if values is None:
        values = {f"{split}/{col}": v for split, ds in splits.items() if ds is not None
                  for col, v in reference_sums(model, ds, layout, objective, batch_size, accelerator,
                                               keep_mode).items()}
        if folder is not None and (accelerator is None or accelerator.is_main_process):
            from safetensors.torch import save_file

            with atomic_dir(folder) as tmp:
                save_file(values, str(tmp / _FILE))
        _say(console, f"reference log-probs of the starting weights: computed{f', cached at {folder}' if folder else ''}")
    else:
        _say(console, f"reference log-probs of the starting weights: reusing cache {folder}")
    out = {}
    for split, ds in splits.items():
        if ds is not None:
            for col in objective.reference_columns:
                ds = ds.add_column(col, values[f"{split}/{col}"].tolist())
        out[split] = ds
    return out


def _load(folder: Path | None, expected: dict[str, int], accelerator) -> dict[str, torch.Tensor] | None:
    """The cached values when every process finds them whole (else all compute: the pass has collectives)."""
    from safetensors.torch import load_file

    values = None
    if folder is not None and (folder / _FILE).is_file():
        try:
            values = load_file(str(folder / _FILE))
        except (OSError, ValueError):
            values = None
        if values is not None and any(k not in values or len(values[k]) != n for k, n in expected.items()):
            values = None
    if accelerator is not None and accelerator.num_processes > 1:
        found = torch.tensor([float(values is not None)], device=accelerator.device)
        if int(accelerator.reduce(found, reduction="sum").item()) != accelerator.num_processes:
            return None
    return values


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message, highlight=False)
