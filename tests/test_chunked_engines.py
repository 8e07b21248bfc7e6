"""The chunked head under the engines that place or partition the model themselves.

DeepSpeed cannot run here, so ZeRO-3's partitioned parameter is emulated the way DeepSpeed does it:
the LM head's weight is whole only during the head's own forward (gathered by a pre-hook, freed by
a post-hook). The chunked head reads it after that forward and in backward.
"""

from __future__ import annotations

import pytest
import torch
from tiny import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from orpo.config import ConfigError, ModelConfig
from orpo.data.collate import PaddedLayout
from orpo.train.chunked import chunked_token_logps
from orpo.train.forward import configure_logps, default_chunk_size, token_logps
from orpo.train.model import load_model, load_tokenizer
from orpo.train.objective import ORPOObjective


def _model(stories_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    return load_model(ModelConfig(init={**TINY, "tie_word_embeddings": False}, tokenizer=str(stories_dir)), tok, seed=0)


@pytest.fixture
def model(stories_dir):
    return _model(stories_dir)


def _partition_like_zero3(head: torch.nn.Linear) -> None:
    """The weight's data exists only inside the head's forward, as under ZeRO-3."""
    whole = head.weight.data

    def gather(module, args):
        module.weight.data = whole

    def free(module, args, out):
        module.weight.data = torch.empty(0, dtype=whole.dtype)

    head.register_forward_pre_hook(gather)
    head.register_forward_hook(free)
    free(head, (), None)


def _batch():
    rows = [{"chosen_input_ids": [1, 5, 6, 7, 8, 2], "chosen_prompt_len": 3,
             "rejected_input_ids": [1, 5, 6, 9, 2], "rejected_prompt_len": 3}]
    return ORPOObjective(beta=0.1).prepare(PaddedLayout(pad_token_id=0)(rows), None)


def test_zero3_takes_the_full_logits_and_gets_the_right_log_probs(stories_dir):
    """``configure_logps`` runs before ``deepspeed.initialize`` partitions the weights (as in a run)."""
    batch = _batch()
    before, after = _model(stories_dir), _model(stories_dir)
    configure_logps(before, "auto")  # what a ZeRO-3 run got before: chunked
    plan = configure_logps(after, "auto", engine="zero3")
    assert not plan.chunked and "ZeRO-3" in plan.describe()
    with pytest.raises(ConfigError, match="ZeRO-3"):
        configure_logps(_model(stories_dir), "chunked", engine="zero3")
    configure_logps(want_model := _model(stories_dir), "full")
    with torch.no_grad():
        want = token_logps(want_model, batch)
    _partition_like_zero3(before.lm_head)
    _partition_like_zero3(after.lm_head)
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        token_logps(before, batch)
    with torch.no_grad():
        torch.testing.assert_close(token_logps(after, batch), want)


def test_chunk_size_is_chosen_for_the_device_the_model_will_run_on(model):
    """A sharding engine moves the model to the GPU after set-up: the plan is for the GPU."""
    vocab = model.lm_head.out_features
    assert configure_logps(model, "auto").chunk_size == default_chunk_size(vocab, "cpu")
    plan = configure_logps(model, "auto", engine="fsdp2", device=torch.device("cuda", 0))
    assert plan.chunk_size == default_chunk_size(vocab, "cuda") > default_chunk_size(vocab, "cpu")
    assert default_chunk_size(151_936, "cuda") == 832 and default_chunk_size(151_936, "cpu") == 64


class _CastsOf(TorchDispatchMode):
    """Counts dtype casts of tensors shaped like the head's weight."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_head_is_cast_once_per_forward_and_once_per_backward():
    """16 chunks in bf16: one cast of the float32 head in the forward, one in the backward (it was
    one per chunk each way: at 128k x 4096 a 1 GiB copy every time)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 16, generator=g, requires_grad=True)
    hidden = torch.randn(64, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 96, (64,), generator=g)
    with _CastsOf(weight.shape) as forward:
        out = chunked_token_logps(hidden, weight, None, targets, chunk_size=4, dtype=torch.bfloat16)
    with _CastsOf(weight.shape) as backward:
        out.sum().backward()
    assert forward.count == 1 and backward.count <= 2  # the second: the float32 gradient back to the weight's dtype
    ref_w = weight.detach().bfloat16().float().requires_grad_()
    z = torch.nn.functional.linear(hidden.detach().bfloat16().float(), ref_w)
    want = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
