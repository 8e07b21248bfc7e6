"""Numerical stress: log-probs of exactly 0 and far below −1e4, fp16 with loss scaling and bf16
autocast on the CPU, and learning rates 1000x (and 1,000,000x) too high. The NaN guard holds: no
non-finite value ever reaches the weights or a checkpoint, and a run that cannot go on says what
to change."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from tiny import TINY

from orpo.config import load_config
from orpo.loss import LOGP_MAX, odds_ratio_loss, orpo_loss
from orpo.train import Trainer, TrainingDiverged, list_checkpoints, read_metrics
from orpo.train.checkpoint import read_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SANE_LR = 1e-3  # what this tiny model trains well with

# Per-token log-probs: a model certain of every token, tiny, moderate, far below −1e4, near float32's end.
EXTREME = [0.0, -1e-30, -1e-6, -0.5, -30.0, -1e4, -1.5e4, -1e5, -1e30]


def _ref_or_loss(lc: float, lr: float) -> float:
    """−log σ(log odds(c) − log odds(r)) at 60 digits, with the module's clamp of log P (LOGP_MAX)."""
    with mpmath.workdps(60):
        def log_odds(logp):
            x = mpmath.mpf(min(logp, LOGP_MAX))
            return x - mpmath.log(-mpmath.expm1(x))

        z = log_odds(lc) - log_odds(lr)
        return float(mpmath.log1p(mpmath.exp(-z)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_orpo_loss_at_exactly_zero_and_far_below_minus_1e4(dtype):
    """Three tokens per response, every combination of EXTREME values: the loss matches a 60-digit
    reference and the loss and its gradient are finite."""
    T = 3
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-9}[dtype]
    for vc in EXTREME:
        for vr in EXTREME:
            token_logps = torch.tensor([[vc] * T, [vr] * T], dtype=dtype, requires_grad=True)
            segment_ids = torch.tensor([[0] * T, [1] * T])
            out = orpo_loss(token_logps, segment_ids, torch.ones(2, T, dtype=torch.bool), num_pairs=1, beta=0.5)
            out.loss.backward()
            assert torch.isfinite(out.loss) and torch.isfinite(token_logps.grad).all(), (vc, vr, dtype)
            lc, lr = float(torch.tensor(vc, dtype=dtype)), float(torch.tensor(vr, dtype=dtype))
            assert out.or_loss.item() == pytest.approx(_ref_or_loss(lc, lr), rel=tol, abs=tol), (vc, vr)
            assert out.nll_loss.item() == pytest.approx(-lc, rel=tol, abs=tol)


def test_odds_ratio_gradient_at_the_extremes():
    """logp = 0 exactly: a chosen response has no gradient left (the model cannot get more certain),
    a rejected one keeps the gradient at the clamp, the strongest push down (~σ · 1e9), never 0; far
    below −1e4 the gradient is the log-sigmoid's ±1, not 0 or NaN."""
    c = torch.tensor([0.0, -1e4, -1e5, -1e4], requires_grad=True)
    r = torch.tensor([0.0, 0.0, -1e5, -1e5], requires_grad=True)
    odds_ratio_loss(c, r).sum().backward()
    assert c.grad.tolist() == [0.0, -1.0, -0.5, pytest.approx(0.0, abs=1e-30)]
    at_clamp = -1.0 / math.expm1(LOGP_MAX)
    assert r.grad.tolist() == [pytest.approx(0.5 * at_clamp, rel=1e-6), pytest.approx(at_clamp, rel=1e-6), 0.5,
                               pytest.approx(0.0, abs=1e-30)]


# ---------------------------------------------------------------------------------------------
# Whole runs


def _cfg(out, stories_dir, hh_path, **train):
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 12},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 2, "learning_rate": SANE_LR,
                  "save_every": 2, "save_total_limit": None, "save_final": False, **train},
    })


def _params(trainer) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().clone() for p in trainer.model.parameters()])


def _logits_dtypes(trainer) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    lm_head = trainer.accelerator.unwrap_model(trainer.model).lm_head
    lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


def _checkpoint_weights_finite(ckpt) -> bool:
    weights = read_weights(ckpt)
    return bool(weights) and all(torch.isfinite(t).all() for t in weights.values())


def test_fp16_on_the_cpu_autocasts_and_loss_scaling_skips_overflows(tmp_path, stories_dir, hh_path):
    """train.mixed_precision fp16 reaches the CPU run (Accelerate alone silently trained in fp32):
    the forward runs in float16 under a GradScaler. Starting from a loss scale of 2**24, the first
    steps overflow: each is skipped and the scale lowered, never counted as a bad step (the run
    would stop at max_bad_steps = 1), and the weights do not move until the scale fits."""
    trainer = Trainer(_cfg(tmp_path, stories_dir, hh_path, mixed_precision="fp16", max_bad_steps=1, max_steps=8),
                      progress=False, on_step_end=lambda t: weights.append(_params(t))).setup()
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    # the same GradScaler class, started where a large model's first steps would overflow
    trainer.accelerator.scaler = trainer.optimizer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    weights = [_params(trainer)]
    dtypes = _logits_dtypes(trainer)
    trainer.train()

    assert set(dtypes) == {torch.float16}
    rows = read_metrics(tmp_path)
    skipped = [r["skipped_steps"] for r in rows]
    assert 0 < skipped[-1] < len(rows) and skipped[0] == 1  # some steps overflowed, then training went on
    assert all(math.isfinite(r["loss"]) for r in rows)  # an overflow is in the scaled gradient, not the loss
    for i, r in enumerate(rows):
        moved = not torch.equal(weights[i], weights[i + 1])
        assert moved == (r["skipped_steps"] == (rows[i - 1]["skipped_steps"] if i else 0)), i
    assert trainer.accelerator.scaler.get_scale() < 2.0**24
    assert all(torch.isfinite(w).all() for w in weights)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_a_learning_rate_1000x_too_high_never_reaches_the_weights(precision, tmp_path, stories_dir, hh_path):
    """At 1000x this model's learning rate the loss climbs, and under fp16 steps overflow, but every
    weight stays finite after every step and in every checkpoint; the run ends normally."""
    cfg = _cfg(tmp_path, stories_dir, hh_path, learning_rate=SANE_LR * 1000, mixed_precision=precision,
               max_steps=8, max_grad_norm=None)
    trainer = Trainer(cfg, progress=False, on_step_end=lambda t: finite.append(bool(torch.isfinite(_params(t)).all())))
    finite: list[bool] = []
    trainer.setup()
    dtypes = _logits_dtypes(trainer)
    trainer.train()

    expected = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert set(dtypes) == {expected}  # the precision setting reached the forward
    assert finite == [True] * 8
    rows = read_metrics(tmp_path)
    assert max(r["loss"] for r in rows if r["loss"] is not None) > 2 * rows[0]["loss"]  # it is too high
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in rows)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-2", "step-4", "step-6", "step-8"]
    assert all(_checkpoint_weights_finite(c) for c in list_checkpoints(tmp_path))


def test_a_learning_rate_far_too_high_stops_and_says_what_to_change(tmp_path, stories_dir, hh_path):
    """At 10**6 x (and no clipping) the first update blows the weights up and every later gradient
    norm is infinite: the run stops after max_bad_steps, writes nothing during the streak, and
    names the checkpoint from before it with the settings to change."""
    cfg = _cfg(tmp_path, stories_dir, hh_path, learning_rate=SANE_LR * 1e6, max_grad_norm=None, save_every=1,
               max_bad_steps=3)
    trainer = Trainer(cfg, progress=False).setup()
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("training diverged: steps 2 to 4 (3 in a row, train.max_bad_steps = 3)")
    assert "lower train.learning_rate (now 1000; try 100)" in message
    assert "set train.max_grad_norm (now off; 1.0 is usual)" in message
    assert message.endswith(f"then resume with train.resume={tmp_path / 'checkpoints' / 'step-1'}.")
    assert info.value.checkpoint == tmp_path / "checkpoints" / "step-1"
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-1"]
    assert _checkpoint_weights_finite(info.value.checkpoint)
