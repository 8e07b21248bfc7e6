"""What the GPU engines hand the trainer, checked on the CPU: the gradient norm is a plain float32
tensor on the accelerator's device, FSDP2 under Accelerate reduces gradients in float32, and
fsdp2 with CPU offload on GPUs asks for a process group with a CPU backend."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from orpo.train import distributed
from orpo.train.distributed import Engine, fsdp2_plugin


class _Acc:
    """An Accelerator stand-in: a device and a clip that returns what the real one would."""

    def __init__(self, device, norm):
        self.device, self._norm = device, norm

    def clip_grad_norm_(self, parameters, max_norm):
        return self._norm


def _model():
    return torch.nn.Linear(2, 2)


@pytest.mark.parametrize("norm", [1.5, None])
def test_deepspeed_norm_lands_on_the_accelerator_device(norm):
    engine = Engine(name="zero2", accelerator=_Acc(torch.device("meta"), norm))  # type: ignore[arg-type]
    out = engine.clip_grad_norm_(_model(), 1.0)
    assert out.device.type == "meta" and out.dtype == torch.float32


@pytest.fixture
def one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_dtensor_norm_comes_back_plain(one_process_group):
    """Accelerate 1.15 returns FSDP2's norm as a DTensor; the trainer's tolist() refuses those."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    dnorm = distribute_tensor(torch.tensor(2.0), mesh, [Replicate()])
    engine = Engine(name="fsdp2", accelerator=_Acc(torch.device("cpu"), dnorm))  # type: ignore[arg-type]
    norm = engine.clip_grad_norm_(_model(), 1.0)
    assert type(norm) is torch.Tensor and norm.dtype == torch.float32
    assert torch.stack([torch.isfinite(torch.tensor(1.0)), torch.isfinite(norm)]).tolist() == [True, True]
    assert float(norm) == 2.0


@pytest.mark.parametrize("mp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_fsdp2_plugin_reduces_in_float32(mp, dtype):
    plugin = fsdp2_plugin(cpu_offload=False, mixed_precision=mp)
    plugin.set_mixed_precision(mp)  # what AcceleratorState does with the Accelerator's precision
    assert plugin.mixed_precision_policy.param_dtype == dtype
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32


def test_process_group_backend():
    process_group_backend = distributed.process_group_backend
    assert process_group_backend("fsdp2", True, True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend("fsdp2", False, True) is None
    assert process_group_backend("fsdp2", True, False) is None
    assert process_group_backend("zero3", True, True) is None


def test_build_engine_asks_accelerate_for_the_cpu_backend(monkeypatch):
    from orpo.config import load_config

    seen = {}

    def fake_accelerator(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "Accelerator", fake_accelerator)
    cfg = load_config(raw={"model": {"name_or_path": "x"}, "data": {"train": "x"},
                           "train": {"output_dir": "x", "distributed": "fsdp2", "cpu_offload": True}})
    with pytest.raises(RuntimeError, match="stop here"):
        distributed.build_engine(cfg, env={"LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    handlers = seen.get("kwargs_handlers") or []
    assert [h.backend for h in handlers] == ["cuda:nccl,cpu:gloo"]
