"""The padding-free layouts on a CUDA GPU: the backends the CPU cannot run (FlexAttention's backward,
FlashAttention's varlen kernel) and CUDA's own sdpa/eager kernels, against the padded layout.

Skipped without CUDA. Needs a CUDA build of torch (FlexAttention compiles with Triton, which CUDA
wheels ship); the FlashAttention case also needs ``flash-attn`` and skips without it. Run:
``pytest -q tests/test_layouts_gpu.py`` (about a minute, most of it FlexAttention compiling).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_layouts import PADDING_FREE, ROW_LENGTH, _assert_same, _compute, rows  # noqa: F401  (rows: fixture)
from transformers import AutoModelForCausalLM

from orpo.data.collate import PaddedLayout, build_layout
from orpo.loss import sequence_logps
from orpo.train.forward import token_logps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to_device(rows_layout):
    """A layout whose batches land on the GPU (``PreferenceBatch.to`` moves masks, BlockMasks included)."""

    def collate(pairs):
        return rows_layout(pairs).to("cuda")

    return collate


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
def test_cuda_backends_match_the_padded_layout_in_float32(stories_dir, rows, impl):  # noqa: F811
    # float32 everywhere (no TF32), so the tolerances of the CPU test hold
    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), attn_implementation=impl).cuda()
    reference = AutoModelForCausalLM.from_pretrained(str(stories_dir), attn_implementation="sdpa").cuda()
    ref = _compute(reference, _to_device(PaddedLayout(pad_token_id=0)), rows, "mask")
    for name in PADDING_FREE:
        got = _compute(model, _to_device(build_layout(name, 0, ROW_LENGTH, impl)), rows, "mask")
        _assert_same(got, ref)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                    reason="needs flash-attn: no wheel on the package index for torch 2.11 + CUDA 13, and a build does "
                    "not fit a 15-minute GPU lease (docs/distributed.md)")
def test_flash_attention_varlen_matches_the_padded_layout_in_bf16(stories_dir, rows):  # noqa: F811
    """FlashAttention runs in bf16 only, so this is a bf16 comparison: per-sequence log-prob sums to
    1% (bf16 keeps 8 bits; a layout bug moves them by far more) and gradient directions."""
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda()
    ref = _compute(model, _to_device(PaddedLayout(pad_token_id=0)), rows, "mask")
    layout = build_layout("packed", 0, ROW_LENGTH, "flash_attention_2")
    batch = layout(rows)
    assert batch.inputs["input_ids"].shape[0] == 1 and "attention_mask" not in batch.inputs
    got = _compute(model, _to_device(layout), rows, "mask")
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=1e-2, atol=0.5)
    for name, g in got[3].items():
        cos = torch.nn.functional.cosine_similarity(g.float().flatten(), ref[3][name].float().flatten(), dim=0)
        assert cos > 0.99, name
    with torch.no_grad():  # and the varlen spans are what isolates the sequences
        bad = layout(rows)
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
            bad.inputs.pop(key)
        bad = bad.to("cuda")
        sums = sequence_logps(token_logps(model, bad), bad.segment_ids, bad.response_mask, 2 * len(rows))[0]
    assert (sums.float() - ref[0].float()).abs().max() > 1.0
