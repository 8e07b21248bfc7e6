"""The rival objectives (sft, simpo, cpo, dpo) next to ORPO: each formula against a hand-written
float64 reference (values and gradients), each config key read back from the built objective's
gradients, and the per-pair values (DPO's reference log-probs) riding in the batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from orpo.config import ConfigError, load_config
from orpo.data.collate import PaddedLayout, pair_values
from orpo.loss import cpo_loss, dpo_loss, simpo_loss
from orpo.train.forward import keep_targets
from orpo.train.objective import (
    SHARED_PAIR_METRICS,
    CPOObjective,
    DPOObjective,
    ORPOObjective,
    SFTObjective,
    SimPOObjective,
    build_objective,
)

# ------------------------------------------------------------------ per-pair formulas vs float64


def _naive_neg_logsigmoid(z: float) -> float:
    return math.log(1.0 + math.exp(-z))


def _check_pair_loss(loss, chosen, rejected, z: list[float], beta: float, tol: dict) -> None:
    """``loss`` is −log σ(z) per pair, and its gradient is ±β · (σ(z) − 1) on the chosen / rejected
    inputs (z = β · (chosen − rejected) + terms that do not depend on them)."""
    expected = torch.tensor([_naive_neg_logsigmoid(v) for v in z], dtype=torch.float64)
    torch.testing.assert_close(loss.double(), expected, **tol)
    loss.sum().backward()
    dz = torch.tensor([1 / (1 + math.exp(-v)) - 1 for v in z], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad.double(), beta * dz, **tol)
    torch.testing.assert_close(rejected.grad.double(), -beta * dz, **tol)


def _pairs(n=16, seed=0, scale=8.0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * scale for _ in range(4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simpo_loss_and_gradient_match_float64_reference(dtype):
    c, r, _, _ = _pairs()
    beta, gamma = 2.0, 0.5
    ci, ri = c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
    loss = simpo_loss(ci, ri, beta, gamma)
    z = [beta * (a - b) - gamma for a, b in zip(c.tolist(), r.tolist(), strict=True)]
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    _check_pair_loss(loss, ci, ri, z, beta, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpo_loss_and_gradient_match_float64_reference(dtype):
    c, r, _, _ = _pairs(scale=300.0)  # summed log-probs: hundreds
    beta = 0.1
    ci, ri = c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
    loss = cpo_loss(ci, ri, beta)
    z = [beta * (a - b) for a, b in zip(c.tolist(), r.tolist(), strict=True)]
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    _check_pair_loss(loss, ci, ri, z, beta, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpo_loss_and_gradient_match_float64_reference_and_leave_the_reference_alone(dtype):
    c, r, rc, rr = _pairs(scale=300.0)
    beta = 0.1
    ci, ri = c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
    rci, rri = rc.to(dtype).requires_grad_(), rr.to(dtype).requires_grad_()
    loss = dpo_loss(ci, ri, rci, rri, beta)
    z = [beta * ((a - ra) - (b - rb)) for a, b, ra, rb in zip(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(),
                                                               strict=True)]
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    _check_pair_loss(loss, ci, ri, z, beta, tol)
    assert rci.grad is None and rri.grad is None  # the reference is a constant
    # at the reference itself every pair costs log 2
    same = dpo_loss(c, r, c, r, beta)
    torch.testing.assert_close(same, torch.full_like(same, math.log(2.0)))


def test_the_pair_losses_stay_finite_far_out():
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    zero = torch.zeros(2)
    for loss in (simpo_loss(big, zero, 2.0, 0.5), cpo_loss(big, zero, 0.1), dpo_loss(big, zero, zero, zero, 0.1)):
        g, = torch.autograd.grad(loss.sum(), big)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert loss[0] < 1e-6 and loss[1] > 100  # −log σ(z) ≈ −z for very negative z


# ------------------------------------------------------------------ whole objectives vs float64


def _rows(ref=True):
    rows = [
        {"chosen_input_ids": [1, 5, 6, 7, 8, 2], "chosen_prompt_len": 3,
         "rejected_input_ids": [1, 5, 6, 9, 2], "rejected_prompt_len": 3},
        {"chosen_input_ids": [1, 4, 10, 11, 12, 13, 2], "chosen_prompt_len": 2,
         "rejected_input_ids": [1, 4, 14, 2], "rejected_prompt_len": 2},
        {"chosen_input_ids": [1, 3, 3, 7, 2], "chosen_prompt_len": 4,
         "rejected_input_ids": [1, 3, 3, 7, 9, 9, 9, 15], "rejected_prompt_len": 4},
    ]
    if ref:
        for i, row in enumerate(rows):
            row["ref_chosen_sum"], row["ref_rejected_sum"] = -3.0 - i, -2.5 + 0.5 * i
    return rows


class FixedLogits(torch.nn.Module):
    """Stands in for a model so the objective's gradient can be read w.r.t. the logits themselves."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def _reference_loss(name, logits, rows, p):
    """Row-by-row float64 loss of objective ``name``, written without orpo.loss."""
    logp = F.log_softmax(logits, dim=-1)
    b = len(rows)
    seqs = [(r["chosen_input_ids"], r["chosen_prompt_len"]) for r in rows] + \
           [(r["rejected_input_ids"], r["rejected_prompt_len"]) for r in rows]
    sums, avgs = [], []
    nll_terms = []
    for i, (ids, plen) in enumerate(seqs):
        vals = [logp[i, t - 1, ids[t]] for t in range(plen, len(ids))]
        sums.append(sum(vals))
        avgs.append(sum(vals) / len(vals))
        if i < b:
            nll_terms += [-v for v in vals]
    nll = sum(nll_terms) / len(nll_terms)

    def nls(z):  # naive −log σ(z)
        return -torch.log(torch.sigmoid(z))

    def log_odds(lp):
        return torch.log(torch.exp(lp) / (1 - torch.exp(lp)))

    pairs = range(b)
    if name == "sft":
        return nll
    if name == "orpo":
        return nll + p["beta"] * sum(nls(log_odds(avgs[i]) - log_odds(avgs[b + i])) for i in pairs) / b
    if name == "simpo":
        pref = sum(nls(p["beta"] * (avgs[i] - avgs[b + i]) - p["gamma"]) for i in pairs) / b
        return p.get("nll_weight", 0.0) * nll + pref
    if name == "cpo":
        return nll + sum(nls(p["beta"] * (sums[i] - sums[b + i])) for i in pairs) / b
    if name == "dpo":
        return sum(nls(p["beta"] * ((sums[i] - rows[i]["ref_chosen_sum"]) - (sums[b + i] - rows[i]["ref_rejected_sum"])))
                   for i in pairs) / b
    raise AssertionError(name)


OBJECTIVES = [
    ("orpo", ORPOObjective, {"beta": 0.3}),
    ("sft", SFTObjective, {}),
    ("simpo", SimPOObjective, {"beta": 2.0, "gamma": 0.5}),
    ("simpo", SimPOObjective, {"beta": 2.5, "gamma": 1.2, "nll_weight": 0.7}),
    ("cpo", CPOObjective, {"beta": 0.1}),
    ("dpo", DPOObjective, {"beta": 0.1}),
]


@pytest.mark.parametrize(("name", "cls", "params"), OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_objective_matches_its_float64_reference_in_value_and_gradient(name, cls, params, seed):
    rows = _rows()
    objective = cls(**params)
    assert objective.name == name
    batch = objective.prepare(PaddedLayout(pad_token_id=0)(rows))
    g = torch.Generator().manual_seed(seed)
    logits64 = (torch.randn(*batch.labels.shape, 17, generator=g, dtype=torch.float64) * 2).requires_grad_()
    model = FixedLogits(logits64.detach().float())
    out = objective(model, batch)
    out.loss.backward()
    expected = _reference_loss(name, logits64, rows, params)
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(model.logits.grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)
    # every objective reports its terms and the shared pair metrics under the same names
    assert set(out.term_sums) == {t.name for t in objective.terms} and "nll_loss" in out.term_sums
    assert set(SHARED_PAIR_METRICS) | {"log_odds_ratio"} <= set(out.pair_sums) == set(objective.pair_metrics)


def test_a_weight_zero_term_is_reported_but_not_optimized():
    rows = _rows()
    batch = DPOObjective().prepare(PaddedLayout(pad_token_id=0)(rows))
    logits = torch.randn(*batch.labels.shape, 17)
    out = DPOObjective()(FixedLogits(logits), batch)
    # the NLL of the chosen responses is there, and the loss is the DPO term alone
    assert out.term_sums["nll_loss"] > 0
    assert out.loss.item() == pytest.approx(out.term_sums["dpo_loss"].item() / batch.num_pairs, rel=1e-6)


def test_dpo_without_reference_values_says_what_is_missing():
    batch = DPOObjective().prepare(PaddedLayout(pad_token_id=0)(_rows(ref=False)))
    with pytest.raises(ValueError, match="reference log-probs"):
        DPOObjective()(FixedLogits(torch.randn(*batch.labels.shape, 17)), batch)


def test_pair_values_ride_along_in_row_order_through_prepare_and_to():
    rows = _rows()
    assert set(pair_values(rows)) == {"ref_chosen_sum", "ref_rejected_sum"}
    batch = PaddedLayout(pad_token_id=0)(rows)
    assert batch.pair_values["ref_chosen_sum"].tolist() == [-3.0, -4.0, -5.0]
    assert batch.pair_values["ref_rejected_sum"].dtype == torch.float32
    kept = keep_targets(batch, batch.response_mask, "mask").to("cpu")
    assert kept.pair_values["ref_rejected_sum"].tolist() == [-2.5, -2.0, -1.5]
    assert PaddedLayout(pad_token_id=0)(_rows(ref=False)).pair_values == {}


# ------------------------------------------------------------------ config keys reach the gradient

TINY = {"arch": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 32}


def _config(stories_dir, **orpo):
    return load_config(raw={"model": {"init": TINY, "tokenizer": str(stories_dir)},
                            "data": {"train": "unused.jsonl"}, "orpo": orpo})


@pytest.fixture(scope="module")
def tiny_model(stories_dir, stories_tokenizer):
    from orpo.train.model import ensure_pad_token, load_model

    ensure_pad_token(stories_tokenizer)
    return load_model(_config(stories_dir).model, stories_tokenizer, seed=0)


def _gradient(model, cfg) -> torch.Tensor:
    objective = build_objective(cfg.orpo)
    batch = objective.prepare(PaddedLayout(pad_token_id=0)(_rows()))
    model.zero_grad()
    objective(model, batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.usefixtures("one_thread")
def test_every_objective_key_changes_the_gradient_of_the_built_objective(tiny_model, stories_dir):
    base = {name: _gradient(tiny_model, _config(stories_dir, objective=name))
            for name in ("orpo", "sft", "simpo", "cpo", "dpo")}
    names = list(base)
    for i, a in enumerate(names):  # orpo.objective: five different gradients
        for b in names[i + 1 :]:
            assert not torch.allclose(base[a], base[b]), (a, b)
    changed = [("orpo", {"beta": 0.5}), ("simpo", {"simpo_beta": 3.0}), ("simpo", {"simpo_gamma": 1.5}),
               ("simpo", {"simpo_nll_weight": 1.0}), ("cpo", {"cpo_beta": 0.5}), ("dpo", {"dpo_beta": 0.5}),
               ("orpo", {"nll_on_prompt": True})]
    for name, keys in changed:
        grad = _gradient(tiny_model, _config(stories_dir, objective=name, **keys))
        assert not torch.allclose(grad, base[name], rtol=1e-4, atol=1e-7), (name, keys)


def test_a_key_of_another_objective_is_refused(stories_dir):
    with pytest.raises(ConfigError, match=r"orpo.simpo_gamma applies to objective 'simpo' only"):
        _config(stories_dir, simpo_gamma=1.0)
    with pytest.raises(ConfigError, match=r"orpo.beta applies to objective 'orpo' only"):
        _config(stories_dir, objective="dpo", beta=0.3)
    with pytest.raises(ConfigError, match=r"orpo.objective"):
        _config(stories_dir, objective="kto")
    assert _config(stories_dir, objective="dpo", dpo_beta=0.3).orpo.dpo_beta == 0.3


@pytest.mark.usefixtures("one_thread")
def test_every_layout_carries_the_pair_values_to_dpo(tiny_model):
    from orpo.data.collate import LAYOUTS, build_layout

    objective = DPOObjective(beta=0.1)
    rows = _rows()
    impl = tiny_model.config._attn_implementation
    losses = {}
    for name in LAYOUTS:
        batch = objective.prepare(build_layout(name, 0, 64, impl)(rows))
        assert batch.pair_values["ref_chosen_sum"].tolist() == [-3.0, -4.0, -5.0], name
        with torch.no_grad():
            out = objective(tiny_model, batch)
        losses[name] = out.loss.item()
        assert out.pair_sums["reward_margin"].item() != 0.0
    assert all(v == pytest.approx(losses["padded"], rel=1e-5) for v in losses.values()), losses
