"""The training step's pieces: accumulation, logits_to_keep, eval weighting, data order, optimizer, model."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tiny import TINY, write_short_pairs

from orpo.config import ConfigError, ModelConfig, TrainConfig, load_config
from orpo.data.collate import PaddedLayout
from orpo.loss import orpo_loss
from orpo.train import ensure_pad_token, evaluate, load_model, load_tokenizer
from orpo.train.model import logits_keep_mode
from orpo.train.objective import ORPOObjective
from orpo.train.optim import build_optimizer, build_scheduler, param_groups
from orpo.train.trainer import Trainer, _collate, epoch_micro_batches


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory):
    """12 short standard-format pairs of varied lengths (HH pairs are all cut to max_length here)."""
    return write_short_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 12)


pytestmark = pytest.mark.usefixtures("one_thread")

def _cfg(tmp_path, stories_dir, data_path, name="run", **train):
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(data_path), "max_length": 64},
        "orpo": {"beta": 0.5},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 2, **train},
    })


@pytest.fixture
def trainer(tmp_path, stories_dir, short_pairs):
    return Trainer(_cfg(tmp_path, stories_dir, short_pairs), progress=False).setup()


def _rows(trainer: Trainer, n: int) -> list[dict]:
    rows = trainer.train_data.__getitems__(list(range(n)))
    assert len({len(r["chosen_input_ids"]) for r in rows}) > 2, "the test needs sequences of different lengths"
    return rows


def test_accumulation_gives_the_gradient_and_loss_of_one_big_batch(tmp_path, stories_dir, short_pairs):
    big = Trainer(_cfg(tmp_path, stories_dir, short_pairs, "big", batch_size=8), progress=False).setup()
    small = Trainer(_cfg(tmp_path, stories_dir, short_pairs, "small", batch_size=2, grad_accum=4),
                    progress=False).setup()
    for p, q in zip(big.model.parameters(), small.model.parameters(), strict=True):
        assert torch.equal(p, q)  # same seed, same init
    rows = _rows(big, 8)
    collate = partial(_collate, layout=big.layout, objective=big.objective, keep_mode=big.keep_mode)

    m_big = big._forward_backward([collate(rows)]).finalize()
    micro = [collate(rows[i : i + 2]) for i in range(0, 8, 2)]
    m_small = small._forward_backward(micro).finalize()

    for key in ("loss", "nll_loss", "or_loss", "log_odds_ratio", "logps_chosen", "logps_rejected", "accuracy",
                "margin"):
        assert m_small[key] == pytest.approx(m_big[key], rel=1e-5, abs=1e-7), key
    # NLL targets of a pair: its chosen response tokens (every token after the prompt), from the rows themselves
    response_tokens = sum(len(r["chosen_input_ids"]) - r["chosen_prompt_len"] for r in rows)
    assert all(r["chosen_prompt_len"] >= 1 for r in rows)
    assert (m_small["pairs"], m_small["nll_tokens"]) == (m_big["pairs"], m_big["nll_tokens"]) == (8, response_tokens)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)

    # The test can fail: averaging each micro-batch's own token mean (the classic bug) differs.
    with torch.no_grad():
        naive = []
        for b in micro:
            logits = big.model(**b.inputs).logits
            from orpo.loss import token_logps_from_logits

            naive.append(orpo_loss(token_logps_from_logits(logits, b.labels), b.segment_ids, b.response_mask,
                                   b.num_pairs, beta=0.5).nll_loss)
    assert abs(float(torch.stack(naive).mean()) - m_big["nll_loss"]) > 1e-4


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_logits_to_keep_is_exact(trainer, nll_on_prompt):
    model = trainer.model
    assert logits_keep_mode(model) == "mask"
    objective = ORPOObjective(beta=0.5, nll_on_prompt=nll_on_prompt)
    # padded: every layout keeps targets the same way (tests/test_layouts.py), and here the positions
    # the loss does not read (padding, and the prompt unless nll_on_prompt) are plain to count
    layout_batch = PaddedLayout(pad_token_id=trainer.tokenizer.pad_token_id)(_rows(trainer, 4))
    results = {}
    for mode in (None, "mask", "positions"):
        model.zero_grad()
        batch = objective.prepare(layout_batch, mode)
        out = objective(model, batch)
        out.loss.backward()
        results[mode] = (out, [p.grad.clone() for p in model.parameters()])
        if mode == "mask":  # only the read positions reach the LM head
            assert batch.labels.ndim == 1 and batch.labels.numel() < (layout_batch.labels != -100).sum()
    ref, ref_grads = results[None]
    for mode in ("mask", "positions"):
        out, grads = results[mode]
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
        for name in ("nll_loss", "or_loss"):
            torch.testing.assert_close(out.term_sums[name], ref.term_sums[name], rtol=1e-6, atol=1e-6)
        for name in ("logps_chosen", "logps_rejected", "log_odds_ratio"):
            torch.testing.assert_close(out.pair_sums[name], ref.pair_sums[name], rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, stories_dir, short_pairs):
    cfg = _cfg(tmp_path, stories_dir, short_pairs, "gc")
    cfg.model.gradient_checkpointing = True
    ckpt = Trainer(cfg, progress=False).setup()
    plain = Trainer(_cfg(tmp_path, stories_dir, short_pairs, "plain"), progress=False).setup()
    on = [getattr(t.model, "is_activation_checkpointing", None) for t in (ckpt, plain)]
    assert on == [True, False]
    batch = _collate(_rows(plain, 4), layout=plain.layout, objective=plain.objective, keep_mode=plain.keep_mode)
    a = ckpt._forward_backward([batch]).finalize()
    b = plain._forward_backward([batch]).finalize()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for p, q in zip(ckpt.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_epochs_set_the_number_of_steps(tmp_path, stories_dir, short_pairs):
    cfg = _cfg(tmp_path, stories_dir, short_pairs, "epochs", max_steps=None, epochs=2, batch_size=5, grad_accum=2)
    trainer = Trainer(cfg, progress=False).setup()
    # 12 pairs in micro-batches of 5: 3 per epoch (5, 5, 2); 2 epochs = 6 micro-batches = 3 steps
    assert (trainer.micro_batches_per_epoch, trainer.total_steps) == (3, 3)


def test_evaluate_weights_by_tokens_and_pairs_not_batches(trainer):
    data = trainer.train_data
    model = trainer.model
    results = [evaluate(model, data, trainer.layout, batch_size=bs, objective=ORPOObjective(beta=0.5)) for bs in (1, 3, len(data))]
    assert model.training  # restored after eval
    for r in results[1:]:
        for key, value in results[0].items():
            assert r[key] == pytest.approx(value, rel=1e-5), key
    r = results[0]
    assert r["pairs"] == len(data)
    assert r["loss"] == pytest.approx(r["nll_loss"] + 0.5 * r["or_loss"])
    assert set(r) >= {"pairs", "accuracy", "logps_chosen", "logps_rejected", "log_odds_ratio", "nll_loss"}


def test_epoch_order_is_seeded_complete_and_split_across_ranks():
    a = epoch_micro_batches(10, 3, seed=7, epoch=0)
    assert a == epoch_micro_batches(10, 3, seed=7, epoch=0)
    assert a != epoch_micro_batches(10, 3, seed=7, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert [len(b) for b in a] == [3, 3, 3, 1]  # the last short micro-batch is kept
    ranks = [epoch_micro_batches(10, 2, seed=7, epoch=0, rank=r, num_processes=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 10 rows in global batches of 4: 4, 4, 2
    assert sorted(i for r in ranks for b in r for i in b) == list(range(10))
    # a last global batch smaller than the number of ranks is dropped, so no rank gets nothing
    assert len(epoch_micro_batches(9, 2, seed=7, epoch=0, rank=0, num_processes=4)) == 1


def test_weight_decay_skips_norms_biases_and_embeddings(stories_tokenizer, stories_dir):
    cfg = ModelConfig(init={**TINY, "attention_bias": True}, tokenizer=str(stories_dir))
    model = load_model(cfg, stories_tokenizer)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.input_layernorm.weight"} <= plain
    assert not any("norm" in n or n.endswith("bias") for n in decayed)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    # fused AdamW on the CPU too (no per-parameter sqrt/division copies), but not under fp16's scaler
    assert opt.defaults["fused"] is True
    assert build_optimizer(model, TrainConfig(weight_decay=0.1, mixed_precision="fp16")).defaults["fused"] is None


@pytest.mark.parametrize(("name", "warmup", "expected"), [
    ("linear", {"warmup_ratio": 0.2}, [0.0, 0.5, 1.0, 0.875, 0.75]),  # ceil(0.2 * 10) = 2 warmup steps
    ("constant", {"warmup_steps": 2}, [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("constant", {}, [1.0] * 5),
    ("inverse_sqrt", {"warmup_steps": 2}, [0.0, 0.5, 1.0, (2 / 3) ** 0.5, 0.5 ** 0.5]),
])
def test_schedules(name, warmup, expected):
    cfg = TrainConfig(lr_scheduler=name, learning_rate=1.0, **warmup)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in expected:
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_cosine_schedule_ends_at_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(lr_scheduler="cosine", learning_rate=1.0), total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)


def test_tokenizer_without_pad_gets_unk(stories_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(stories_dir)))
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0
    assert ensure_pad_token(tok).added_from is None  # already set: left alone
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(stories_dir))
    raw.unk_token = None
    choice = ensure_pad_token(raw)
    assert (choice.added_from, raw.pad_token) == ("eos", "</s>")
    assert "eos" in choice.describe()


def test_init_model_takes_vocab_and_ids_from_the_tokenizer_and_is_seeded(stories_dir):
    cfg = ModelConfig(init=TINY, tokenizer=str(stories_dir))
    tok = load_tokenizer(cfg)
    a, b, c = load_model(cfg, tok, seed=3), load_model(cfg, tok, seed=3), load_model(cfg, tok, seed=4)
    assert (a.config.vocab_size, a.config.bos_token_id, a.config.eos_token_id, a.config.pad_token_id) == (512, 1, 2, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_qlora_without_cuda_is_a_clear_error(stories_dir, stories_tokenizer):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = ModelConfig(name_or_path=str(stories_dir), lora={}, load_in_4bit=True)
    with pytest.raises(ConfigError, match="CUDA"):
        load_model(cfg, stories_tokenizer)
