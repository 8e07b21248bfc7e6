"""The ORPO objective (Hong, Lee & Thorne, EMNLP 2024), as small pure functions.

    L = L_SFT + λ · L_OR
    L_SFT = −(1/N) Σ log P(y_w,t | x, y_w,<t)        token mean over the chosen responses
    L_OR  = −log σ( log odds(y_w|x) − log odds(y_l|x) )
    log P(y|x) = (1/|y|) Σ_t log P(y_t | x, y_<t)    length-averaged response log-probability
    odds(y|x)  = P(y|x) / (1 − P(y|x))

Legend (paper → here): λ → ``beta`` (TRL's name; ``lambda`` is accepted in config), y_w → chosen,
y_l → rejected, log P(y|x) → ``logps_*``, log odds(y_w) − log odds(y_l) → ``log_odds_ratio``.

Everything here works on per-token log-probabilities that the caller has already gathered, so the
same math serves every batch layout (padded, packed, prompt-shared): a layout only has to say
which sequence each target token belongs to (``segment_ids``) and whether it is a response token.
All reductions run in float32 whatever the model's dtype: bf16 has 8 bits of mantissa, too few for
a sum over hundreds of log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# log P = 0 exactly (a model certain of a whole response) makes odds = P/(1−P) infinite. We clamp
# log-probs to at most LOGP_MAX before taking log odds. At −1e-6, log(1−exp(logp)) ≈ −13.8, so
# log odds saturates near +13.8: still monotone for every logp below the clamp, finite, and with
# finite gradients. Anything in (−1e-6, 0] is treated as "certain"; its gradient through the
# clamp is zero, which is the right answer for a pair the model cannot become more certain of.
LOGP_MAX = -1e-6
_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate across the whole range.

    Mächler (2012): near 0, exp(x) ≈ 1 and ``log1p(-exp(x))`` loses every digit, so use
    ``log(-expm1(x))``; far below 0, ``expm1`` rounds to −1 and ``log1p(-exp(x))`` is the
    accurate one. The switch point −ln 2 is where both have the same error.
    """
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """Elementwise log odds ``logp − log(1 − exp(logp))``, in float32 (float64 stays float64).

    Inputs above ``LOGP_MAX`` are clamped to it (see the module constant), so the result is finite
    for every finite input, including ``logp = 0``.
    """
    x = _as_float(logps).clamp(max=LOGP_MAX)
    return x - log1mexp(x)


def odds_ratio_loss(logps_chosen: torch.Tensor, logps_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``−log σ(log odds(chosen) − log odds(rejected))``, float32 out for fp32/bf16 in."""
    return -F.logsigmoid(log_odds(logps_chosen) - log_odds(logps_rejected))


def sequence_logps(
    token_logps: torch.Tensor,
    segment_ids: torch.Tensor,
    response_mask: torch.Tensor,
    num_sequences: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count response-token log-probs per sequence.

    ``segment_ids`` gives each target position its sequence index in ``[0, num_sequences)`` (−1 for
    none); only positions with ``response_mask`` count. Returns ``(sums, counts)``, shape
    ``[num_sequences]``; the length-averaged log P(y|x) is ``sums / counts``.
    """
    mask = response_mask & (segment_ids >= 0)
    idx = segment_ids[mask].long()
    vals = _as_float(token_logps)[mask]
    sums = torch.zeros(num_sequences, dtype=vals.dtype, device=vals.device).index_add_(0, idx, vals)
    counts = torch.zeros(num_sequences, dtype=vals.dtype, device=vals.device).index_add_(
        0, idx, torch.ones_like(vals)
    )
    return sums, counts


def nll_target_mask(
    segment_ids: torch.Tensor, response_mask: torch.Tensor, num_pairs: int, nll_on_prompt: bool = False
) -> torch.Tensor:
    """Targets the NLL averages over: chosen response tokens, plus the chosen prompt's if asked."""
    mask = (segment_ids >= 0) & (segment_ids < num_pairs)
    return mask if nll_on_prompt else mask & response_mask


@dataclass
class ORPOOutput:
    """The loss to backpropagate and the metrics a user watches (detached, float32 scalars).

    ``loss``/``nll_loss`` are normalized by ``nll_normalizer`` and ``or_loss`` by ``or_normalizer``
    when given (see ``orpo_loss``), so summing the outputs of the micro-batches of one optimizer
    step gives the loss of the whole step.
    """

    loss: torch.Tensor
    nll_loss: torch.Tensor
    or_loss: torch.Tensor
    log_odds_ratio: torch.Tensor
    logps_chosen: torch.Tensor
    logps_rejected: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    num_pairs: int
    num_nll_tokens: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """The logged scalars (still tensors: call ``.item()`` once, at logging time)."""
        return {
            "loss": self.loss.detach(),
            "nll_loss": self.nll_loss,
            "or_loss": self.or_loss,
            "log_odds_ratio": self.log_odds_ratio,
            "logps_chosen": self.logps_chosen,
            "logps_rejected": self.logps_rejected,
            "accuracy": self.accuracy,
            "margin": self.margin,
        }


@dataclass
class PairLogps:
    """Per-pair log-probs of a batch, what every preference objective is computed from.

    ``chosen`` / ``rejected``: length-averaged response log-probs (the paper's log P(y|x)), float32;
    ``chosen_sum`` / ``rejected_sum`` and ``*_tokens``: their sums and token counts (DPO and CPO use
    sums); ``nll_sum``: −Σ log P over the NLL's targets (``nll_target_mask``), ``nll_tokens`` their count.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    nll_sum: torch.Tensor
    nll_tokens: torch.Tensor
    num_pairs: int


def pair_logps(
    token_logps: torch.Tensor,
    segment_ids: torch.Tensor,
    response_mask: torch.Tensor,
    num_pairs: int,
    nll_on_prompt: bool = False,
) -> PairLogps:
    """Reduce per-target token log-probs to per-pair log-probs and the chosen NLL sum.

    Sequences ``0 .. num_pairs−1`` are the chosen responses and ``num_pairs .. 2·num_pairs−1`` the
    rejected ones, pair ``i`` being ``(i, num_pairs + i)``. ``token_logps`` holds log P of each target
    token (any value where there is no target: those positions must have ``segment_ids == −1``).
    """
    segment_ids = segment_ids.long()
    sums, counts = sequence_logps(token_logps, segment_ids, response_mask, 2 * num_pairs)
    # A sequence without response tokens would be 0/0; the data pipeline never produces one, but a
    # clamp keeps a hand-built batch from turning the whole step into NaN.
    logps = sums / counts.clamp(min=1.0)
    nll_mask = nll_target_mask(segment_ids, response_mask, num_pairs, nll_on_prompt)
    return PairLogps(
        chosen=logps[:num_pairs], rejected=logps[num_pairs:],
        chosen_sum=sums[:num_pairs], rejected_sum=sums[num_pairs:],
        chosen_tokens=counts[:num_pairs], rejected_tokens=counts[num_pairs:],
        nll_sum=-_as_float(token_logps)[nll_mask].sum(), nll_tokens=nll_mask.sum(), num_pairs=num_pairs,
    )


def orpo_loss(
    token_logps: torch.Tensor,
    segment_ids: torch.Tensor,
    response_mask: torch.Tensor,
    num_pairs: int,
    beta: float = 0.1,
    nll_on_prompt: bool = False,
    nll_normalizer: float | torch.Tensor | None = None,
    or_normalizer: float | torch.Tensor | None = None,
) -> ORPOOutput:
    """ORPO loss from per-target token log-probs (layout as in ``pair_logps``).

    NLL is a mean over **tokens**, not a mean of per-row means, so a long response weighs what its
    tokens weigh. With ``nll_on_prompt`` the chosen prompt's tokens count too: that is what TRL
    does and what the official code does without ``--disable_prompt_loss``; the default (off) is
    the paper's L_SFT on the response only.

    ``nll_normalizer`` / ``or_normalizer``: the token and pair counts of the whole optimizer step
    (all micro-batches, all ranks). Under gradient accumulation, dividing each micro-batch's sums by
    these global counts makes the summed gradient equal to that of one big batch. Default: this
    batch's own counts.
    """
    lp = pair_logps(token_logps, segment_ids, response_mask, num_pairs, nll_on_prompt)
    nll_den = nll_normalizer if nll_normalizer is not None else lp.nll_tokens.clamp(min=1)
    nll = lp.nll_sum / nll_den
    or_den = or_normalizer if or_normalizer is not None else max(num_pairs, 1)
    or_loss = odds_ratio_loss(lp.chosen, lp.rejected).sum() / or_den

    loss = nll + beta * or_loss
    with torch.no_grad():
        ratio = log_odds(lp.chosen) - log_odds(lp.rejected)
        return ORPOOutput(
            loss=loss,
            nll_loss=nll.detach(),
            or_loss=or_loss.detach(),
            log_odds_ratio=ratio.mean(),
            logps_chosen=lp.chosen.mean(),
            logps_rejected=lp.rejected.mean(),
            accuracy=(lp.chosen > lp.rejected).float().mean(),
            margin=(lp.chosen - lp.rejected).mean(),
            num_pairs=num_pairs,
            num_nll_tokens=lp.nll_tokens,
        )


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log P(label) per position, in float32; 0 where ``labels == -100`` (no target).

    ``labels`` are already aligned with ``logits`` (position t predicts ``labels[t]``). Only the
    positions with a target are upcast to float32, never the whole ``[.., T, V]`` tensor: with
    prompts and padding excluded that is often less than half of it.
    """
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != -100).nonzero(as_tuple=True)[0]
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, keep).float()
    picked = -F.cross_entropy(rows, flat_labels.index_select(0, keep), reduction="none")
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=logits.device)
    return out.index_put((keep,), picked).view(labels.shape)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()
