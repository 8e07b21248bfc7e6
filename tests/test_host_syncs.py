"""Host syncs of a training step, counted on the CPU: what would stall the GPU on CUDA.

A data-dependent op (``nonzero``, ``.item()``/``.tolist()``/``bool()``, boolean-mask indexing,
``masked_select``, ``unique``, ``repeat_interleave`` with tensor repeats) needs the device's answer
before the host can go on. On the CPU they cost nothing, but counting them shows what would sync on
CUDA. Only our code is counted: the mode pauses inside the model's own forward (transformers' mask
building is not ours), through forward pre/post hooks on the top module, and inside the optimizer's
step (torch's CPU Adam reads its step count with ``.item()``; on CUDA the fused kernel does not).
``Tensor.tolist`` does not dispatch a ``_local_scalar_dense``, so it is counted by a patch.

Still counted, and not ours to remove: with ``keep_mode == "mask"`` (the tiny Llama's) the backward
of transformers' ``hidden_states[:, logits_to_keep]`` with our CPU-built bool mask is a bool
``index_put``, one per micro-batch.
"""

from __future__ import annotations

import pytest
import torch
from tiny import TINY, write_short_pairs
from torch.utils._python_dispatch import TorchDispatchMode

from orpo.config import load_config
from orpo.train.trainer import Trainer

ALWAYS = {"nonzero", "_local_scalar_dense", "masked_select", "_unique", "_unique2", "unique_dim",
          "unique_consecutive"}
BOOL_INDEXED = {"index", "index_put_", "index_put", "_index_put_impl_"}


class SyncCounter(TorchDispatchMode):
    """Counts data-dependent ops outside the model's forward (``paused``)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        counted = (name in ALWAYS or (name in BOOL_INDEXED and _bool_index(args))
                   or (name == "repeat_interleave" and isinstance(args[-1] if len(args) > 1 else args[0], torch.Tensor)))
        if not self.paused and counted:
            self.ops.append(name)
        return func(*args, **kwargs)


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_short_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 8)


pytestmark = pytest.mark.usefixtures("one_thread")

# Per optimizer step on a non-logged step: the finiteness check's one readback (``_optimizer_step``).
PROMISED = 1


def count_step(trainer: Trainer, monkeypatch, batches=None) -> list[str]:
    """The data-dependent ops of one optimizer step, the model's forward and the optimizer's step excluded."""
    counter = SyncCounter()
    top, optimizer = trainer.model, trainer.engine.torch_optimizer

    def pause(*_):
        counter.paused = True

    def resume(*_):
        counter.paused = False

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if not counter.paused:
            counter.ops.append("tolist")
        return tolist(self)

    if batches is None:
        stream = trainer._micro_batches()
        batches = [next(stream)[0] for _ in range(trainer.cfg.train.grad_accum)]
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    handles = [top.register_forward_pre_hook(pause), top.register_forward_hook(resume),
               optimizer.register_step_pre_hook(pause), optimizer.register_step_post_hook(resume)]
    try:
        with counter:
            trainer._step(batches)
    finally:
        for h in handles:
            h.remove()
        monkeypatch.undo()
    return counter.ops


@pytest.mark.parametrize("logps", ["auto", "full"])
@pytest.mark.parametrize("objective", ["orpo", "sft", "simpo", "cpo", "dpo"])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt", "packed_shared_prompt"])
def test_one_host_sync_per_optimizer_step(tmp_path, stories_dir, pairs, layout, objective, logps, monkeypatch):
    cfg = load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(pairs), "max_length": 64, "layout": layout},
        "orpo": {"objective": objective},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "grad_accum": 2,
                  "logps": logps, "log_every": 100},
    })
    trainer = Trainer(cfg, progress=False).setup()
    ops = count_step(trainer, monkeypatch)
    print(f"SYNCS {layout} {objective} {logps} {len(ops)} {sorted(set(ops))}")
    model_backward = cfg.train.grad_accum if trainer.keep_mode == "mask" else 0
    assert ops.count("tolist") == PROMISED, ops
    assert sorted(ops) == sorted(["tolist"] * PROMISED + ["index_put"] * model_backward), ops


class TwoProcesses:
    """The trainer's accelerator as one of two processes whose partner holds the same batches:
    ``reduce`` doubles, as an all-reduce over two equal ranks would, without a process group."""

    num_processes = 2

    def __init__(self, accelerator):
        self._accelerator = accelerator

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def reduce(self, tensor, reduction="sum"):
        return tensor * 2


def test_several_processes_read_the_global_counts_back_with_the_finiteness_check(tmp_path, stories_dir, pairs,
                                                                                 monkeypatch):
    """With several processes the step's counts are all-reduced; reading them back is part of the one sync."""
    cfg = load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(pairs), "max_length": 64, "layout": "packed"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "grad_accum": 2},
    })
    trainer = Trainer(cfg, progress=False).setup()
    stream = trainer._micro_batches()
    batches = [next(stream)[0] for _ in range(2)]
    trainer.accelerator = TwoProcesses(trainer.accelerator)
    ops = count_step(trainer, monkeypatch, batches)
    assert ops.count("tolist") == PROMISED, ops
    out = trainer._step(batches)
    assert out.sums.counts[2] == 2 * sum(b.num_tokens() for b in batches)


def _trainer(tmp_path, stories_dir, pairs, **model):
    cfg = load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir), **model},
        "data": {"train": str(pairs), "max_length": 64, "layout": "packed"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2},
    })
    return Trainer(cfg, progress=False).setup()


def test_block_masks_are_built_on_the_models_device(tmp_path, stories_dir, pairs, monkeypatch):
    """FlexAttention's BlockMask is built where the model runs (0.6 s per 4x2048 micro-batch on the CPU)."""
    from torch.nn.attention import flex_attention

    trainer = _trainer(tmp_path, stories_dir, pairs, attn_implementation="flex_attention")
    seen = []

    def create_block_mask(*args, device, **kwargs):
        seen.append(torch.device(device))
        return "block mask"

    monkeypatch.setattr(flex_attention, "create_block_mask", create_block_mask)
    monkeypatch.setattr(type(trainer.accelerator), "device", property(lambda self: torch.device("meta")))
    batch, _ = next(trainer._micro_batches())
    assert seen == [torch.device("meta")]
    assert batch.inputs["attention_mask"] == "block mask"


def test_the_data_loader_pins_memory_when_cuda_is_there(tmp_path, stories_dir, pairs, monkeypatch):
    """Pinned batches are what makes ``PreferenceBatch.to(non_blocking=True)`` not wait for the copy."""
    from orpo.train import trainer as trainer_module

    trainer = _trainer(tmp_path, stories_dir, pairs)
    asked = []
    real = trainer_module.DataLoader

    def loader(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "DataLoader", loader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    next(trainer._micro_batches())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    next(trainer._micro_batches())
    assert asked == [True, False]
