"""Batch layouts: every padding-free layout computes what the padded one does, and the keys reach the batches.

Exactness is checked where it matters: per-pair response log-probs, the ORPO loss and the gradient
of every parameter, on the real pretrained stories260K Llama and on a fresh Qwen2, on real HH pairs
and on hand-made pairs of very different lengths (a BOS-only prompt, an empty prompt, prompts that
differ by a boundary token), with and without ``logits_to_keep``.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from orpo.config import ConfigError, DataConfig, ModelConfig, load_config
from orpo.data import prepare_data
from orpo.data.collate import (
    AttentionRule,
    PackedLayout,
    PackedSharedPromptLayout,
    PaddedLayout,
    SharedPromptLayout,
    build_layout,
    first_fit_decreasing,
    layout_for_model,
    resolve_layout,
    shared_prefix_len,
)
from orpo.loss import sequence_logps
from orpo.train import Trainer, read_metrics
from orpo.train.forward import token_logps
from orpo.train.model import load_model, load_tokenizer, logits_keep_mode
from orpo.train.objective import ORPOObjective
from orpo.train.trainer import _collate, epoch_micro_batches, token_budget_batches

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN2 = {"arch": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64}
TINY = {**QWEN2, "arch": "llama"}
PADDING_FREE = ["packed", "shared_prompt", "packed_shared_prompt"]
ROW_LENGTH = 160  # data.max_length of the test rows: HH pairs fill it, the hand-made ones are far shorter


def _row(prompt, chosen, rejected, rejected_prompt=None):
    rp = prompt if rejected_prompt is None else rejected_prompt
    return {"chosen_input_ids": prompt + chosen, "chosen_prompt_len": len(prompt),
            "rejected_input_ids": rp + rejected, "rejected_prompt_len": len(rp)}


@pytest.fixture(scope="module")
def rows(hh_path, stories_dir, tmp_path_factory):
    """4 real HH pairs (long prompts, some cut at ROW_LENGTH) and 5 hand-made ones of 2 to 40 tokens."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    cfg = DataConfig(train=str(hh_path), max_length=ROW_LENGTH, max_samples=4,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    hh = prepare_data(cfg, tok, chat_template="none").train
    real = [{k: hh[i][k] for k in ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids",
                                   "rejected_prompt_len")} for i in range(len(hh))]
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(3, 500, (n,), generator=g).tolist()

    p = [1, *toks(6)]
    made = [
        _row([1, *toks(20)], toks(3), toks(19)),
        _row([1], toks(2), toks(30)),  # BOS-only prompt: nothing to share but the BOS itself
        _row([], toks(4), toks(1)),  # no prompt at all (a tokenizer without BOS, plain template)
        _row(p, toks(9), toks(5), rejected_prompt=p[:-1] + [p[-1] + 1, 7]),  # boundary merge: prompts differ
        _row([1, *toks(3)], toks(40), toks(2)),
    ]
    assert len({len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in real + made}) >= 8
    return real + made


@pytest.fixture(scope="module")
def models(stories_dir):
    """The real stories260K Llama under sdpa and eager, and a fresh 2-layer Qwen2 (sdpa)."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    qwen = load_model(ModelConfig(init=QWEN2, tokenizer=str(stories_dir)), tok)
    return {
        "stories-sdpa": AutoModelForCausalLM.from_pretrained(str(stories_dir), attn_implementation="sdpa"),
        "stories-eager": AutoModelForCausalLM.from_pretrained(str(stories_dir), attn_implementation="eager"),
        "qwen2-sdpa": qwen,
    }


def _compute(model, layout, rows, keep_mode, nll_on_prompt=False):
    """Per-sequence log-prob sums and counts, the objective's output and every parameter's gradient,
    through the trainer's path (``prepare`` on the CPU batch, then the objective's forward)."""
    objective = ORPOObjective(beta=0.5, nll_on_prompt=nll_on_prompt)
    model.train()
    model.zero_grad(set_to_none=True)
    batch = objective.prepare(layout(rows), keep_mode)
    out = objective(model, batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        sums, counts = sequence_logps(token_logps(model, batch), batch.segment_ids, batch.response_mask,
                                      2 * len(rows))
    return sums, counts, out, grads, batch


def _assert_same(got, ref):
    """Equal to float32 round-off. The layouts add the same terms in another order (a softmax over
    another row length, matmuls of other shapes take other BLAS blockings), each op good to float32's
    ~1.2e-7 relative. Measured on this machine: per-sequence log-prob sums (~100 terms, ~-400) differ
    by <= 3e-7 relative, the loss by <= 1e-6, a gradient entry by <= 1e-6 of its tensor's largest
    entry (a gradient sums thousands of products; entries that cancel to near zero keep the absolute
    error of the big terms, so the bound is on the tensor's scale, not each entry's). Tolerances:
    1e-6 relative for log-probs, 1e-5 for the loss terms, and 1e-5 of the tensor's largest entry
    (+1e-4 relative) for gradients: 10x the round-off seen, while a layout bug (a token seeing another
    sequence, a shifted label) moves log-probs by 1e-2 and more (checked below)."""
    sums, counts, out, grads, batch = got
    r_sums, r_counts, r_out, r_grads, r_batch = ref
    assert torch.equal(counts, r_counts) and batch.num_tokens() == r_batch.num_tokens()
    assert [batch.num_nll_tokens(p) for p in (False, True)] == [r_batch.num_nll_tokens(p) for p in (False, True)]
    torch.testing.assert_close(sums, r_sums, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.loss, r_out.loss, rtol=1e-5, atol=1e-6)
    for key, value in {**r_out.term_sums, **r_out.pair_sums}.items():
        got_value = out.term_sums.get(key, out.pair_sums.get(key))
        torch.testing.assert_close(got_value, value, rtol=1e-5, atol=1e-5, msg=key)
    for name, g in grads.items():
        r = r_grads[name]
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()) + 1e-12, msg=name)


@pytest.mark.parametrize("keep_mode", [None, "model's"])
@pytest.mark.parametrize("model_name", ["stories-sdpa", "stories-eager", "qwen2-sdpa"])
def test_every_layout_matches_the_padded_layout(models, rows, model_name, keep_mode):
    """``keep_mode`` "model's": what this transformers version's forward takes (``logits_keep_mode``:
    "mask" where it has ``slice_logits_to_keep``, "positions" before, as in transformers 5.17)."""
    model = models[model_name]
    keep_mode = logits_keep_mode(model) if keep_mode else None
    impl = model.config._attn_implementation
    ref = _compute(model, PaddedLayout(pad_token_id=0), rows, keep_mode)
    for name in PADDING_FREE:
        layout = build_layout(name, 0, ROW_LENGTH, impl)
        got = _compute(model, layout, rows, keep_mode)
        _assert_same(got, ref)
        assert got[4].num_positions() < ref[4].num_positions(), name  # and it computes fewer positions
    # The check can fail: the same rows packed without a mask (every token sees its whole row) differ.
    bad = build_layout("packed", 0, ROW_LENGTH, impl)
    unmasked = bad(rows)
    unmasked.inputs.pop("attention_mask")
    unmasked.inputs.pop("position_ids")
    with torch.no_grad():
        logps = token_logps(model, unmasked)
        sums, _ = sequence_logps(logps, unmasked.segment_ids, unmasked.response_mask, 2 * len(rows))
    assert (sums - ref[0]).abs().max() > 1e-2


@pytest.mark.parametrize("layout_name", PADDING_FREE)
def test_nll_on_prompt_reads_the_same_prompt_targets(models, rows, layout_name):
    model = models["stories-sdpa"]
    mode = logits_keep_mode(model)
    ref = _compute(model, PaddedLayout(pad_token_id=0), rows, mode, nll_on_prompt=True)
    _assert_same(_compute(model, build_layout(layout_name, 0, ROW_LENGTH), rows, mode, nll_on_prompt=True), ref)


def test_flex_attention_gets_a_block_mask_of_the_same_rule(rows):
    """FlexAttention reads the rule as its ``mask_mod``: materialized by flex itself it must equal the
    dense mask sdpa gets (exactness-tested above). Flex cannot run here: torch 2.13 on the CPU has
    no flex backward ("does not support backward on CPU"), and its CPU forward fails to compile
    for multi-row masks (an Inductor C++ codegen error), so the flex forward/backward exactness
    test runs on a GPU (tests/test_layouts_gpu.py)."""
    from torch.nn.attention.flex_attention import create_mask

    for name in ("packed", "packed_shared_prompt"):
        layout = build_layout(name, 0, ROW_LENGTH, "flex_attention")
        batch = layout(rows)
        block_mask = batch.inputs["attention_mask"]
        assert type(block_mask).__name__ == "BlockMask"
        n, t = batch.inputs["input_ids"].shape
        assert block_mask.shape == (n, 1, t, t)
        dense = build_layout(name, 0, ROW_LENGTH, "sdpa")(rows).inputs["attention_mask"]
        assert torch.equal(create_mask(block_mask.mask_mod, n, 1, t, t, device="cpu"), dense)
        moved = pickle.loads(pickle.dumps(batch)).to("cpu")  # DataLoader workers pickle batches
        assert torch.equal(moved.inputs["attention_mask"].kv_num_blocks, block_mask.kv_num_blocks)
        assert torch.equal(create_mask(moved.inputs["attention_mask"].mask_mod, n, 1, t, t, device="cpu"), dense)


def _varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What FlashAttention's varlen kernel computes, on the CPU: causal attention within each
    ``cu_seq_lens_q`` span of the one packed row (and a failure if the spans never arrive)."""
    assert attention_mask is None and query.shape[0] == 1
    cu = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:], strict=False))
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = [torch.nn.functional.scaled_dot_product_attention(query[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                            is_causal=True, scale=scaling)
           for a, b in zip(cu, cu[1:], strict=False)]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def test_varlen_inputs_reach_attention_and_match_padded(stories_dir, rows):
    """The FlashAttention path (one row, position ids, ``cu_seq_lens``) through the real Llama and Qwen2
    stacks, with a CPU stand-in for the flash kernel: the kwargs must travel from ``model(**inputs)``
    down to every attention call, and the spans must be the sequences."""
    AttentionInterface.register("varlen_reference", _varlen_reference)
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    for init in (TINY, QWEN2):
        model = load_model(ModelConfig(init=init, tokenizer=str(stories_dir),
                                       attn_implementation="varlen_reference"), tok)
        sdpa = load_model(ModelConfig(init=init, tokenizer=str(stories_dir), attn_implementation="sdpa"), tok)
        layout = build_layout("packed", 0, ROW_LENGTH, "flash_attention_2")  # the layout FlashAttention gets
        batch = layout(rows)
        assert batch.inputs["input_ids"].shape[0] == 1 and "attention_mask" not in batch.inputs
        assert batch.num_positions() == batch.num_tokens()  # not one pad position
        mode = logits_keep_mode(model)
        _assert_same(_compute(model, layout, rows, mode), _compute(sdpa, PaddedLayout(pad_token_id=0), rows, mode))
    with pytest.raises(ConfigError, match="FlashAttention"):
        build_layout("shared_prompt", 0, ROW_LENGTH, "flash_attention_2")


def test_packed_rows_hold_isolated_sequences_with_their_own_positions(rows):
    batch = PackedLayout(pad_token_id=0, max_length=ROW_LENGTH)(rows)
    ids, pos, mask = batch.inputs["input_ids"], batch.inputs["position_ids"], batch.inputs["attention_mask"]
    assert ids.shape[1] <= ROW_LENGTH and mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
    assert batch.num_tokens() == sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    starts = (pos == 0).sum()  # every sequence restarts at 0 (and each pad position is a 0 too)
    pads = (ids.shape[0] * ids.shape[1]) - batch.num_tokens()
    assert starts == 2 * len(rows) + pads
    # one sequence's tokens: they see exactly themselves, causally
    row, start = 0, 0
    n = int((pos[row, 1:] != 0).long().cumprod(0).sum()) + 1
    seen = mask[row, 0, start : start + n]
    assert torch.equal(seen[:, start : start + n], torch.ones(n, n, dtype=torch.bool).tril())
    assert not seen[:, start + n :].any()


def test_shared_prompt_rejected_never_sees_chosen(rows):
    layout = SharedPromptLayout(pad_token_id=0)
    batch = layout(rows)
    row = rows[0]
    k = shared_prefix_len(row)
    lc, lr = len(row["chosen_input_ids"]), len(row["rejected_input_ids"])
    assert k == row["chosen_prompt_len"] - 1  # same prompt tokens: all but the last one shared
    ids, pos, mask = batch.inputs["input_ids"][0], batch.inputs["position_ids"][0], batch.inputs["attention_mask"][0, 0]
    assert ids[: lc + lr - k].tolist() == row["chosen_input_ids"] + row["rejected_input_ids"][k:]
    assert pos[: lc + lr - k].tolist() == list(range(lc)) + list(range(k, lr))  # rejected continues the prompt
    chosen = slice(k, lc)
    rejected = slice(lc, lc + lr - k)
    assert not mask[rejected, chosen].any() and not mask[chosen, rejected].any()
    assert mask[rejected, :k].all() and mask[chosen, :k].all()  # both branches see the whole prefix
    # the prompt's last token, computed twice, predicts the first chosen and the first rejected token
    assert batch.labels[0, k] == row["chosen_input_ids"][k + 1] and batch.labels[0, lc] == row["rejected_input_ids"][k + 1]
    assert batch.response_mask[0, k] and batch.response_mask[0, lc]
    assert batch.segment_ids[0, k] == 0 and batch.segment_ids[0, lc] == len(rows)
    # prompts that differ by a boundary token share only their common prefix
    assert shared_prefix_len(rows[-2]) == 5 and shared_prefix_len(rows[-3]) == 0 and shared_prefix_len(rows[-4]) == 0


def test_packed_shared_prompt_fills_rows_and_computes_fewest_positions(rows):
    positions = {}
    for name in ["padded", *PADDING_FREE]:
        positions[name] = build_layout(name, 0, ROW_LENGTH)(rows).num_positions()
    assert positions["packed_shared_prompt"] < positions["packed"] < positions["padded"]
    assert positions["packed_shared_prompt"] < positions["shared_prompt"] < positions["padded"]
    with pytest.raises(ConfigError, match="max_length"):
        PackedSharedPromptLayout(pad_token_id=0)


def test_eager_gets_an_additive_mask_and_flash_no_mask():
    rule = AttentionRule(torch.tensor([[0, 0, 1, -1]]), torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 0, 0]]))
    assert rule.dense()[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                           [False, False, True, False], [False, False, False, True]]
    r = [_row([1, 5], [6], [7, 8])]
    eager = build_layout("packed", 0, 8, "eager", torch.bfloat16)(r).inputs["attention_mask"]
    assert eager.dtype == torch.bfloat16 and eager.max() == 0 and eager.min() == torch.finfo(torch.bfloat16).min
    flash = build_layout("packed", 0, 8, "flash_attention_2")(r).inputs
    assert set(flash) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 7] and flash["cu_seq_lens_q"].dtype == torch.int32
    with pytest.raises(ConfigError, match="padding-free"):
        build_layout("packed", 0, 8, "paged|eager")


@pytest.mark.parametrize("lengths", [[5] * 7, [3, 9, 1, 4, 4, 8, 2, 10, 6]])
def test_first_fit_decreasing_places_every_item_once_within_capacity(lengths):
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) <= 11 / 9 * -(-sum(lengths) // 10) + 1  # FFD's bound: 11/9 of the optimum, plus 6/9


def test_token_budget_micro_batches_are_seeded_within_budget_and_in_step_across_ranks():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(10, 200, (50,), generator=g).tolist()
    lengths[7] = 900  # longer than the budget: alone
    a = epoch_micro_batches(50, 8, seed=3, epoch=0, lengths=lengths, max_tokens=500)
    assert a == epoch_micro_batches(50, 8, seed=3, epoch=0, lengths=lengths, max_tokens=500)
    assert a != epoch_micro_batches(50, 8, seed=3, epoch=1, lengths=lengths, max_tokens=500)
    assert sorted(i for b in a for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 500 or b == [7] for b in a)
    assert len({len(b) for b in a}) > 2  # the pair count follows the lengths
    for world in (2, 3, 4):
        ranks = [epoch_micro_batches(50, 8, 3, 0, r, world, lengths, 500) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1
        assert sorted(i for r in ranks for b in r for i in b) == list(range(50))  # the tail was split, not dropped
    # too few rows left for every rank: dropped, as with a fixed batch size
    assert token_budget_batches([0, 1, 2], [400, 400, 30], 500, 4) == []
    assert token_budget_batches([0, 1, 2, 3, 4], [100, 400, 30, 20, 10], 500, 4) == [[0], [1], [2], [3, 4]]


# ---------------------------------------------------------------------------------------------
# The keys, read back from what the Trainer builds


def _cfg(tmp_path, stories_dir, data_path, name, data=None, model=None, **train):
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir), **(model or {})},
        "data": {"train": str(data_path), "max_length": 192, "max_samples": 16, "eval_fraction": 0.25, **(data or {})},
        "orpo": {"beta": 0.5},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 3, "batch_size": 4, "grad_accum": 2,
                  "learning_rate": 1e-3, "eval_every": 3, "save_final": False, **train},
    })


def _first_batches(trainer, n=4):
    stream = trainer._micro_batches()
    return [next(stream)[0] for _ in range(n)]


def test_data_layout_changes_what_the_model_sees(tmp_path, stories_dir, hh_path):
    seen = {}
    for name in ["padded", *PADDING_FREE]:
        trainer = Trainer(_cfg(tmp_path, stories_dir, hh_path, name, data={"layout": name}), progress=False).setup()
        batches = _first_batches(trainer)
        seen[name] = batches
        assert [b.num_pairs for b in batches] == [4] * 4
        if name == "padded":
            assert isinstance(trainer.layout, PaddedLayout)
            assert all(b.inputs["attention_mask"].ndim == 2 and "position_ids" not in b.inputs for b in batches)
        else:
            assert all(b.inputs["attention_mask"].ndim == 4 and b.inputs["position_ids"].min() == 0 for b in batches)
    tokens = [b.num_tokens() for b in seen["padded"]]
    for name in PADDING_FREE:
        assert [b.num_tokens() for b in seen[name]] == tokens  # same pairs in the same order, same count
        assert sum(b.num_positions() for b in seen[name]) < sum(b.num_positions() for b in seen["padded"])
    assert isinstance(trainer.layout, PackedSharedPromptLayout) and trainer.layout.max_length == 192


def test_max_tokens_per_batch_forms_micro_batches_by_tokens(tmp_path, stories_dir, hh_path):
    trainer = Trainer(_cfg(tmp_path, stories_dir, hh_path, "budget", data={"layout": "packed"},
                           max_tokens_per_batch=700), progress=False).setup()
    batches = _first_batches(trainer, 6)
    assert all(b.num_tokens() <= 700 for b in batches)
    assert all(b.inputs["input_ids"].shape[1] <= 192 for b in batches)  # rows of data.max_length
    assert len({b.num_pairs for b in batches}) > 1 and max(b.num_pairs for b in batches) < 4
    assert trainer.micro_batches_per_epoch == len(trainer.epoch_order(0))
    per_epoch = sum(trainer.epoch_order(0), [])
    assert sorted(per_epoch) == list(range(len(trainer.train_data)))


@pytest.mark.parametrize(("name", "budget"), [("packed", None), ("shared_prompt", None),
                                               ("packed_shared_prompt", 700)])
def test_a_training_run_in_each_layout_logs_the_padded_runs_metrics(tmp_path, stories_dir, hh_path, name, budget):
    extra = {"max_tokens_per_batch": budget} if budget else {}
    runs = {}
    for layout in ("padded", name):
        cfg = _cfg(tmp_path, stories_dir, hh_path, layout, data={"layout": layout}, **extra)
        trainer = Trainer(cfg, progress=False).setup()
        assert isinstance(trainer.layout, PaddedLayout) == (layout == "padded")
        trainer.train()
        runs[layout] = read_metrics(tmp_path / layout)
    assert len(runs["padded"]) == len(runs[name]) == 5  # 3 steps + eval at 0 and 3
    for ref, got in zip(runs["padded"], runs[name], strict=True):
        assert set(ref) == set(got)
        for key, value in ref.items():
            if key != "tokens_per_s":
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], key)


def test_layouts_refuse_models_they_would_get_wrong(stories_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    windowed = load_model(ModelConfig(init={**QWEN2, "use_sliding_window": True, "sliding_window": 32,
                                            "max_window_layers": 0},
                                      tokenizer=str(stories_dir)), tok)
    with pytest.raises(ConfigError, match="sliding window"):
        layout_for_model("packed", windowed, 0, 96)
    assert isinstance(layout_for_model("padded", windowed, 0, 96), PaddedLayout)
    bloom = load_model(ModelConfig(init={"arch": "bloom", "hidden_size": 32, "n_layer": 1, "n_head": 4},
                                   tokenizer=str(stories_dir)), tok)
    with pytest.raises(ConfigError, match="position_ids"):
        layout_for_model("shared_prompt", bloom, 0, 96)
    with pytest.raises(ConfigError, match="attention mask"):
        load_config(raw={"model": {"name_or_path": "x", "attn_implementation": "flash_attention_2"},
                         "data": {"train": "x.jsonl", "layout": "shared_prompt"}})


def test_auto_takes_the_fastest_layout_the_model_runs_exactly(tmp_path, stories_dir, hh_path):
    """data.layout auto (the default): packed_shared_prompt where a mask is taken, packed under
    FlashAttention, padded for a model no padding-free layout fits; read back from the built layout."""
    trainer = Trainer(_cfg(tmp_path, stories_dir, hh_path, "keep"), progress=False).setup()
    assert trainer.cfg.data.layout == "auto" and isinstance(trainer.layout, PackedSharedPromptLayout)
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    model.config._attn_implementation = "flash_attention_2"  # only the choice is built, no forward runs
    layout, line = resolve_layout("auto", model, 0, 96)
    assert type(layout) is PackedLayout and "not packed_shared_prompt" in line and "FlashAttention" in line
    windowed = load_model(ModelConfig(init={**QWEN2, "use_sliding_window": True, "sliding_window": 32,
                                            "max_window_layers": 0},
                                      tokenizer=str(stories_dir)), tok)
    layout, line = resolve_layout("auto", windowed, 0, 96)
    assert isinstance(layout, PaddedLayout) and line.startswith("layout: padded (data.layout auto; not packed_")
    assert "sliding window" in line
    layout, line = resolve_layout("shared_prompt", windowed, 0, 16)  # a named layout is not second-guessed
    assert type(layout) is SharedPromptLayout and line == "layout: shared_prompt"


def test_collate_keeps_targets_of_a_packed_batch(tmp_path, stories_dir, hh_path):
    """The trainer's collate (layout, then the objective's ``keep_targets``) on a packed batch."""
    trainer = Trainer(_cfg(tmp_path, stories_dir, hh_path, "keep", data={"layout": "packed"}), progress=False).setup()
    rows = trainer.train_data.__getitems__([0, 1, 2])
    batch = _collate(rows, layout=trainer.layout, objective=trainer.objective, keep_mode=trainer.keep_mode)
    if trainer.keep_mode == "mask":
        assert batch.inputs["logits_to_keep"].shape == batch.inputs["input_ids"].shape
        assert batch.labels.ndim == 1 and (batch.labels != -100).all()
    else:  # transformers before slice_logits_to_keep (5.17): the columns any row reads
        assert trainer.keep_mode == "positions" and batch.inputs["logits_to_keep"].ndim == 1
        assert batch.labels.shape[1] == len(batch.inputs["logits_to_keep"])
        assert (batch.labels != -100).any(dim=0).all()


def test_resume_with_a_token_budget_matches_the_uninterrupted_run(tmp_path, stories_dir, hh_path):
    """Token-budget epochs differ in their number of micro-batches (5, then 6 here); a run resumed in
    epoch 1 rebuilds the same order and continues step for step into epoch 2."""

    def cfg(**extra):
        return _cfg(tmp_path, stories_dir, hh_path, "run", data={"layout": "packed_shared_prompt"},
                    max_tokens_per_batch=1000, max_steps=6, save_every=2, eval_every=None, **extra)

    class Stop(Exception):
        pass

    def stop_after_5(trainer):
        if trainer.state.step == 5:
            raise Stop

    reference = Trainer(cfg(), progress=False).setup()
    assert [len(reference.epoch_order(e)) for e in range(2)] == [5, 6]
    reference.train()
    rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(tmp_path / "run")]
    assert [r for r in rows if "loss" in r][-1]["epoch"] > 2  # 12 micro-batches: 5 + 6 + 1
    with pytest.raises(Stop):
        Trainer(cfg(overwrite=True), progress=False, on_step_end=stop_after_5).setup().train()
    resumed = Trainer(cfg(resume="auto"), progress=False).setup()
    assert resumed.resume_from.name == "step-4" and (resumed.state.epoch, resumed.state.micro_batch) == (1, 3)
    resumed.train()
    again = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(tmp_path / "run")]
    assert again == rows


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_with_a_token_budget_step_together_like_one(tmp_path, stories_dir, hh_path):
    """Rank r takes budget micro-batches r, r + 2, ...: two processes with grad_accum 1 see the same
    global steps as one process with grad_accum 2, packed rows and 4D masks included."""
    import json
    import os
    import subprocess
    import sys

    def raw(name, grad_accum):
        return {"model": {"init": TINY, "tokenizer": str(stories_dir)},
                "data": {"train": str(hh_path), "max_length": 64, "max_samples": 10, "eval_fraction": 0.2,
                         "layout": "packed"},
                "train": {"output_dir": str(tmp_path / name), "max_steps": 2, "max_tokens_per_batch": 300,
                          "grad_accum": grad_accum, "eval_batch_size": 1, "learning_rate": 1e-3,
                          "save_final": False}}

    script = tmp_path / "run.py"
    script.write_text("import json, sys\nfrom orpo.config import load_config\nfrom orpo.train import train\n"
                      "train(load_config(raw=json.loads(sys.argv[1])), progress=False)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(raw("ddp", 1))], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = Trainer(load_config(raw=raw("one", 2)), progress=False).setup()
    assert [len(b) for b in one.epoch_order(0)][:4] == [2, 2, 2, 2]  # 128-token pairs, 300-token budget
    one.train()
    ddp, ref = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in ref]
    for a, b in zip(ddp, ref, strict=True):
        for key, value in b.items():
            if key not in ("tokens_per_s", "step"):
                assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
