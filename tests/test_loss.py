"""The ORPO objective against hand-written float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from orpo.data.collate import PaddedLayout
from orpo.loss import (
    LOGP_MAX,
    log1mexp,
    log_odds,
    odds_ratio_loss,
    orpo_loss,
    sequence_logps,
    token_logps_from_logits,
)

EDGE_LOGPS = [0.0, -1e-9, -1e-3, -math.log(2.0), -50.0]


def ref_log_odds(logp: float) -> float:
    """Naive float64 log odds: log(p / (1 - p)), with the same clamp as the module."""
    p = math.exp(min(logp, LOGP_MAX))
    return math.log(p / (1.0 - p))


def ref_or_loss(lc: float, lr: float) -> float:
    z = ref_log_odds(lc) - ref_log_odds(lr)
    return math.log1p(math.exp(-z)) if z > -30 else -z  # -log sigmoid(z)


def test_log1mexp_matches_float64_reference_on_both_branches():
    x = torch.tensor([-1e-12, -1e-6, -0.3, -0.69, -0.7, -1.0, -5.0, -40.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-12, atol=1e-15)
    # float32 keeps relative accuracy near 0, where log1p(-exp(x)) would return -inf
    x32 = torch.tensor([-1e-7, -1e-4], dtype=torch.float32)
    assert torch.isfinite(log1mexp(x32)).all()
    torch.testing.assert_close(log1mexp(x32).double(), torch.log(-torch.expm1(x32.double())), rtol=1e-5, atol=0)


def test_log_odds_and_or_loss_match_reference_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    lc = -torch.rand(64, generator=g, dtype=torch.float64) * 6
    lr = -torch.rand(64, generator=g, dtype=torch.float64) * 6
    expected_lo = torch.tensor([ref_log_odds(v) for v in lc.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log_odds(lc), expected_lo, rtol=1e-10, atol=1e-12)
    expected = torch.tensor([ref_or_loss(a, b) for a, b in zip(lc.tolist(), lr.tolist(), strict=True)],
                            dtype=torch.float64)
    torch.testing.assert_close(odds_ratio_loss(lc, lr), expected.double(), rtol=1e-10, atol=1e-12)
    # float32 and bfloat16 inputs come out as float32
    assert odds_ratio_loss(lc.float(), lr.float()).dtype == torch.float32
    out_bf16 = odds_ratio_loss(lc.bfloat16(), lr.bfloat16())
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16.double(), expected.double(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_values_and_gradients_at_edge_logps(dtype):
    for lc in EDGE_LOGPS:
        for lr in EDGE_LOGPS:
            c = torch.tensor([lc], dtype=dtype, requires_grad=True)
            r = torch.tensor([lr], dtype=dtype, requires_grad=True)
            loss = odds_ratio_loss(c, r).sum()
            loss.backward()
            assert torch.isfinite(loss), (lc, lr, dtype)
            assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all(), (lc, lr, dtype)
    lo = log_odds(torch.tensor(EDGE_LOGPS, dtype=dtype))
    assert torch.isfinite(lo).all()
    assert (lo[:-1] >= lo[1:]).all(), "log odds must be monotone in logp"


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    # keep inputs away from the clamp, where the function is smooth
    lc = (-torch.rand(6, generator=g, dtype=torch.float64) * 4 - 1e-3).requires_grad_()
    lr = (-torch.rand(6, generator=g, dtype=torch.float64) * 4 - 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(odds_ratio_loss, (lc, lr))
    x = torch.tensor([-1e-4, -0.5, -0.7, -3.0, -30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log1mexp, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_or_loss_gradient_near_certainty_matches_float64(dtype):
    """The corner where a clamp at −1e-6 once zeroed the rejected side's gradient (at −9e-7: 0,
    exact 1.1e6). Down to the clamp every gradient is the exact one; above it a rejected response
    keeps the gradient at the clamp, a chosen one gets 0."""
    def exact(lc: float, lr: float) -> tuple[float, float]:
        lo = lambda v: v - math.log(-math.expm1(v))  # noqa: E731
        s = 1.0 / (1.0 + math.exp(lo(lc) - lo(lr)))  # σ(−z), z the log odds ratio
        return -s / -math.expm1(lc), s / -math.expm1(lr)

    for lc, lr in [(-0.5, -9e-7), (-0.5, -1e-8), (-2e-9, -0.3), (-1e-6, -3e-6), (-0.5, -1e-9)]:
        c = torch.tensor([lc], dtype=dtype, requires_grad=True)
        r = torch.tensor([lr], dtype=dtype, requires_grad=True)
        odds_ratio_loss(c, r).sum().backward()
        want_c, want_r = exact(min(lc, LOGP_MAX), min(lr, LOGP_MAX))
        assert c.grad.item() == pytest.approx(want_c, rel=1e-5), (lc, lr)
        assert r.grad.item() == pytest.approx(want_r, rel=1e-5), (lc, lr)
    for lr in (0.0, -1e-12):
        c, r = torch.tensor([-0.5], dtype=dtype, requires_grad=True), torch.tensor([lr], dtype=dtype, requires_grad=True)
        odds_ratio_loss(c, r).sum().backward()
        assert r.grad.item() == pytest.approx(exact(-0.5, LOGP_MAX)[1], rel=1e-5) and r.grad.item() > 1e8
    c, r = torch.tensor([0.0], dtype=dtype, requires_grad=True), torch.tensor([-0.5], dtype=dtype, requires_grad=True)
    odds_ratio_loss(c, r).sum().backward()
    assert c.grad.item() == 0.0


def test_gradient_of_or_loss_prefers_chosen():
    c = torch.tensor([-2.0], requires_grad=True)
    r = torch.tensor([-2.0], requires_grad=True)
    odds_ratio_loss(c, r).sum().backward()
    assert c.grad.item() < 0 < r.grad.item()  # descent raises chosen, lowers rejected


# --- the full objective on a collated batch -------------------------------------------------

def _rows():
    return [
        {"chosen_input_ids": [1, 5, 6, 7, 8, 2], "chosen_prompt_len": 3,
         "rejected_input_ids": [1, 5, 6, 9, 2], "rejected_prompt_len": 3},
        {"chosen_input_ids": [1, 4, 10, 11, 12, 13, 2], "chosen_prompt_len": 2,
         "rejected_input_ids": [1, 4, 14, 2], "rejected_prompt_len": 2},
    ]


def _batch_and_logits(vocab=16, seed=0):
    batch = PaddedLayout(pad_token_id=0)(_rows())
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch.labels.shape, vocab, generator=g, dtype=torch.float64)
    return batch, logits


def _reference(batch, logits, beta, nll_on_prompt=False):
    """Row-by-row float64 ORPO, written independently of loss.py."""
    logp = F.log_softmax(logits.double(), dim=-1)
    ids = batch.inputs["input_ids"]
    lens = batch.inputs["attention_mask"].sum(1).tolist()
    rows = _rows()
    prompt_lens = [r["chosen_prompt_len"] for r in rows] + [r["rejected_prompt_len"] for r in rows]
    b = batch.num_pairs
    avg, nll_sum, nll_n = [], 0.0, 0
    for i in range(2 * b):
        vals = []
        for t in range(prompt_lens[i], lens[i]):  # response token positions
            vals.append(logp[i, t - 1, ids[i, t]].item())
        avg.append(sum(vals) / len(vals))
        if i < b:
            start = 1 if nll_on_prompt else prompt_lens[i]
            for t in range(start, lens[i]):
                nll_sum -= logp[i, t - 1, ids[i, t]].item()
                nll_n += 1
    or_terms = [ref_or_loss(avg[i], avg[b + i]) for i in range(b)]
    nll = nll_sum / nll_n
    return nll + beta * sum(or_terms) / b, nll, avg


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_orpo_loss_matches_rowwise_reference(nll_on_prompt):
    batch, logits = _batch_and_logits()
    tok = token_logps_from_logits(logits, batch.labels)
    out = orpo_loss(tok, batch.segment_ids, batch.response_mask, batch.num_pairs, beta=0.3,
                    nll_on_prompt=nll_on_prompt)
    loss, nll, avg = _reference(batch, logits, 0.3, nll_on_prompt)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.nll_loss.item() == pytest.approx(nll, rel=1e-5)
    assert out.logps_chosen.item() == pytest.approx(sum(avg[:2]) / 2, rel=1e-5)
    assert out.logps_rejected.item() == pytest.approx(sum(avg[2:]) / 2, rel=1e-5)
    acc = sum(avg[i] > avg[2 + i] for i in range(2)) / 2
    assert out.accuracy.item() == acc
    ratio = sum(ref_log_odds(avg[i]) - ref_log_odds(avg[2 + i]) for i in range(2)) / 2
    assert out.log_odds_ratio.item() == pytest.approx(ratio, rel=1e-5)
    assert out.margin.item() == pytest.approx((sum(avg[:2]) - sum(avg[2:])) / 2, rel=1e-5)


def test_nll_is_token_weighted_not_mean_of_row_means():
    batch, logits = _batch_and_logits()
    tok = token_logps_from_logits(logits, batch.labels)
    out = orpo_loss(tok, batch.segment_ids, batch.response_mask, batch.num_pairs, beta=0.0)
    chosen = (batch.segment_ids >= 0) & (batch.segment_ids < 2) & batch.response_mask
    per_row = [(-tok[i][chosen[i]]).mean().item() for i in range(2)]
    token_mean = (-tok[chosen]).mean().item()
    assert out.nll_loss.item() == pytest.approx(token_mean, rel=1e-6)
    assert abs(token_mean - sum(per_row) / 2) > 1e-4  # rows have 3 and 5 tokens: the two differ


def test_prompt_and_pad_logits_change_nothing():
    batch, logits = _batch_and_logits()
    tok = token_logps_from_logits(logits, batch.labels)
    base = orpo_loss(tok, batch.segment_ids, batch.response_mask, batch.num_pairs, beta=0.1)
    changed = logits.clone()
    no_response = ~batch.response_mask  # prompt targets and padding
    changed[no_response] = torch.randn_like(changed[no_response]) * 10
    tok2 = token_logps_from_logits(changed, batch.labels)
    out = orpo_loss(tok2, batch.segment_ids, batch.response_mask, batch.num_pairs, beta=0.1)
    assert out.loss.item() == base.loss.item()
    # ... and gradients never flow to those positions
    leaf = logits.clone().requires_grad_()
    orpo_loss(token_logps_from_logits(leaf, batch.labels), batch.segment_ids, batch.response_mask,
              batch.num_pairs, beta=0.1).loss.backward()
    assert leaf.grad[no_response].abs().max().item() == 0.0
    assert leaf.grad[batch.response_mask].abs().max().item() > 0.0


def test_beta_zero_is_plain_sft_on_chosen_responses():
    batch, logits = _batch_and_logits()
    tok = token_logps_from_logits(logits, batch.labels)
    out = orpo_loss(tok, batch.segment_ids, batch.response_mask, batch.num_pairs, beta=0.0)
    chosen_labels = batch.labels.clone()
    keep = (batch.segment_ids < batch.num_pairs) & batch.response_mask
    chosen_labels[~keep] = -100
    sft = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chosen_labels.reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(sft.item(), rel=1e-6)


def test_global_normalizers_make_microbatch_losses_add_up():
    batch, logits = _batch_and_logits()
    tok = token_logps_from_logits(logits, batch.labels)
    full = orpo_loss(tok, batch.segment_ids, batch.response_mask, batch.num_pairs, beta=0.5)
    n_tok = float(full.num_nll_tokens)
    total = 0.0
    # split the batch into its two pairs, as two micro-batches of one step
    for i in range(2):
        rows_sel = torch.tensor([i, 2 + i])
        seg = batch.segment_ids[rows_sel].clone()
        seg[seg >= 0] = torch.where(seg[seg >= 0] < 2, 0, 1)
        part = orpo_loss(tok[rows_sel], seg, batch.response_mask[rows_sel], 1, beta=0.5,
                         nll_normalizer=n_tok, or_normalizer=2.0)
        total += part.loss.item()
    assert total == pytest.approx(full.loss.item(), rel=1e-6)


def test_sequence_logps_ignores_unassigned_positions():
    tok = torch.tensor([[-1.0, -2.0, -3.0, 99.0]])
    seg = torch.tensor([[0, 0, 1, -1]])
    resp = torch.tensor([[True, True, True, True]])
    sums, counts = sequence_logps(tok, seg, resp, 2)
    assert sums.tolist() == [-3.0, -3.0] and counts.tolist() == [2.0, 1.0]


def test_token_logps_from_logits_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 11, generator=g).bfloat16()
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    out = token_logps_from_logits(logits, labels)
    ref = F.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref[labels == -100] = 0
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
