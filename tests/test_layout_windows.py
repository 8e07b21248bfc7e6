"""Attention that is not plain causal (a sliding window, Llama-4's chunked attention) in the layouts.

A padding-free layout hands the model a 4D mask that replaces the one transformers builds, window
and chunks included. Multimodal checkpoints (Gemma-3 4B/12B/27B load as
``Gemma3ForConditionalGeneration``, Llama-4) keep the window in ``config.text_config``, where a
check of the top-level config never looks: ``data.layout: auto`` then trained them with the wrong
mask (a tiny Gemma-3, window 8: padded −128.115 vs packed −128.975).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Llama4ForCausalLM, Llama4TextConfig

from orpo.config import ConfigError
from orpo.data.collate import (
    PackedLayout,
    PaddedLayout,
    attention_span,
    build_layout,
    layout_for_model,
    resolve_layout,
)
from orpo.loss import sequence_logps
from orpo.train.forward import token_logps
from orpo.train.objective import ORPOObjective

TEXT = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}


def _gemma3(window: int) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config={**TEXT, "sliding_window": window, "layer_types": ["sliding_attention", "full_attention"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4)
    config._attn_implementation = "sdpa"
    return Gemma3ForConditionalGeneration(config).eval()


def _rows() -> list[dict]:
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(3, 60, (n,), generator=g).tolist()

    prompt = [2, *toks(14)]
    return [{"chosen_input_ids": prompt + toks(12), "chosen_prompt_len": len(prompt),
             "rejected_input_ids": prompt + toks(10), "rejected_prompt_len": len(prompt)}]


def _sums(model, layout) -> torch.Tensor:
    batch = ORPOObjective(beta=0.1).prepare(layout(_rows()), None)
    with torch.no_grad():
        return sequence_logps(token_logps(model, batch), batch.segment_ids, batch.response_mask, 2)[0]


def test_a_window_in_the_text_config_is_seen_and_auto_falls_back_to_padded():
    model = _gemma3(window=8)
    assert getattr(model.config, "sliding_window", None) is None  # only text_config has it
    assert attention_span(model.config) == ("a sliding window", 8)
    # why it matters: the custom mask of a packed row has no window, so the log-probs differ
    padded = _sums(model, PaddedLayout(pad_token_id=0))
    packed = _sums(model, build_layout("packed", 0, 64, "sdpa", torch.float32))
    assert (padded - packed).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="sliding window of 8 tokens"):
        layout_for_model("packed", model, 0, 64)
    layout, line = resolve_layout("auto", model, 0, 64)
    assert isinstance(layout, PaddedLayout) and "sliding window" in line
    # rows no longer than the window: it never cuts, so the packed layout is exact and allowed
    assert isinstance(layout_for_model("packed", model, 0, 8), PackedLayout)


def test_chunked_attention_is_refused_under_every_backend():
    config = Llama4TextConfig(**TEXT, intermediate_size_mlp=64, attention_chunk_size=8, num_local_experts=1)
    model = Llama4ForCausalLM(config)
    assert attention_span(model.config) == ("chunked attention", 8)
    for impl in ("sdpa", "flash_attention_2"):
        model.config._attn_implementation = impl
        with pytest.raises(ConfigError, match="chunked attention of 8 tokens"):
            layout_for_model("packed", model, 0, 64)


def test_layer_types_without_a_windowed_layer_keep_the_padding_free_layouts():
    model = _gemma3(window=8)
    model.config.text_config.layer_types = ["full_attention", "full_attention"]
    assert attention_span(model.config) is None
    layout, line = resolve_layout("auto", model, 0, 64)
    assert line.startswith("layout: packed_shared_prompt")
