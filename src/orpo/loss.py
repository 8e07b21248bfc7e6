"""The ORPO objective (Hong, Lee & Thorne, EMNLP 2024), as small pure functions.

    L = L_SFT + λ · L_OR
    L_SFT = −(1/N) Σ log P(y_w,t | x, y_w,<t)        token mean over the chosen responses
    L_OR  = −log σ( log odds(y_w|x) − log odds(y_l|x) )
    log P(y|x) = (1/|y|) Σ_t log P(y_t | x, y_<t)    length-averaged response log-probability
    odds(y|x)  = P(y|x) / (1 − P(y|x))

Legend (paper → here): λ → ``beta`` (TRL's name; ``lambda`` is accepted in config), y_w → chosen,
y_l → rejected, log P(y|x) → ``logps_*``, log odds(y_w) − log odds(y_l) → ``log_odds_ratio``.

The rival objectives (``orpo.objective``) are per-pair losses on the same ``PairLogps``:

    SFT    L = L_SFT                                          (ORPO with λ = 0)
    SimPO  L_pair = −log σ( β · (log P̄(y_w|x) − log P̄(y_l|x)) − γ )    length-averaged (Meng et al. 2024)
    CPO    L = L_SFT + L_pair,  L_pair = −log σ( β · (log π(y_w|x) − log π(y_l|x)) )   summed (Xu et al. 2024)
    DPO    L_pair = −log σ( β · ((log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))) )  summed

log P̄ = ``logps_*`` (the mean over response tokens, as ORPO); log π = ``*_sum`` (the sum over
response tokens, as the CPO and DPO papers and TRL's CPO/DPO trainers); π_ref = the starting weights.

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

# log P = 0 exactly (a model certain of a whole response) makes odds = P/(1−P) infinite, so log
# odds are taken of log-probs clamped to at most LOGP_MAX. At −1e-9 log odds saturate near +20.7
# and their gradient, 1/(1 − P), near 1e9: finite in float32 (whose exp(−1e-9) is already 1.0,
# which is why log1mexp keeps each branch to the inputs it is exact for). Below the clamp every
# value and gradient is exact. Above it, what the gradient should be depends on the side:
# - chosen: zero, the right answer for a response the model cannot become more certain of;
# - rejected: the gradient at the clamp (the largest anywhere), never zero: a model certain of the
#   rejected response is where the push down must be strongest (``odds_ratio_loss``).
LOGP_MAX = -1e-9
_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate across the whole range.

    Mächler (2012): near 0, exp(x) ≈ 1 and ``log1p(-exp(x))`` loses every digit, so use
    ``log(-expm1(x))``; far below 0, ``expm1`` rounds to −1 and ``log1p(-exp(x))`` is the
    accurate one. The switch point −ln 2 is where both have the same error.
    """
    # the far branch only sees inputs it is exact for: where() passes a zero gradient to the branch it
    # does not take, and 0 times log1p's infinite derivative at exp(x) = 1 would be NaN
    far = torch.log1p(-torch.exp(x.clamp(max=_LN_HALF)))
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(x)), far)


def log_odds(logps: torch.Tensor, grad_above_clamp: bool = False) -> torch.Tensor:
    """Elementwise log odds ``logp − log(1 − exp(logp))``, in float32 (float64 stays float64).

    Inputs above ``LOGP_MAX`` are clamped to it (see the module constant), so the result is finite
    for every finite input, including ``logp = 0``. ``grad_above_clamp``: there the value is still
    the clamp's, but the gradient is the one at the clamp instead of zero.
    """
    x = _as_float(logps)
    clamped = x.clamp(max=LOGP_MAX)
    if grad_above_clamp:
        clamped = x + (clamped - x).detach()
    return clamped - log1mexp(clamped)


def odds_ratio_loss(logps_chosen: torch.Tensor, logps_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``−log σ(log odds(chosen) − log odds(rejected))``, float32 out for fp32/bf16 in.

    A rejected response the model is certain of keeps its gradient (``log_odds``'s
    ``grad_above_clamp``), a chosen one has none left to get.
    """
    return -F.logsigmoid(log_odds(logps_chosen) - log_odds(logps_rejected, grad_above_clamp=True))


def simpo_loss(logps_chosen: torch.Tensor, logps_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per-pair SimPO loss ``−log σ(β·(logp̄_c − logp̄_r) − γ)`` on length-averaged log-probs."""
    return -F.logsigmoid(beta * (_as_float(logps_chosen) - _as_float(logps_rejected)) - gamma)


def cpo_loss(sum_chosen: torch.Tensor, sum_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair CPO preference term ``−log σ(β·(log π_c − log π_r))`` on summed log-probs (add the NLL)."""
    return -F.logsigmoid(beta * (_as_float(sum_chosen) - _as_float(sum_rejected)))


def dpo_loss(sum_chosen: torch.Tensor, sum_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss ``−log σ(β·((log π_c − log π_ref,c) − (log π_r − log π_ref,r)))``, summed log-probs.

    The reference values are constants (no gradient flows into them).
    """
    chosen = _as_float(sum_chosen) - _as_float(ref_chosen).detach()
    rejected = _as_float(sum_rejected) - _as_float(ref_rejected).detach()
    return -F.logsigmoid(beta * (chosen - rejected))


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
    # Positions outside the mask go to one extra bin, dropped after: boolean-mask indexing would
    # need the device to say how many positions there are (a host sync); this has a known size.
    idx = torch.where(mask, segment_ids.long(), num_sequences).reshape(-1)
    vals = _as_float(token_logps).reshape(-1)
    sums = torch.zeros(num_sequences + 1, dtype=vals.dtype, device=vals.device).index_add_(0, idx, vals)
    counts = torch.zeros(num_sequences + 1, dtype=vals.dtype, device=vals.device).index_add_(
        0, idx, mask.reshape(-1).to(vals.dtype)
    )
    return sums[:num_sequences], counts[:num_sequences]


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
        nll_sum=-torch.where(nll_mask, _as_float(token_logps), 0.0).sum(), nll_tokens=nll_mask.sum(),
        num_pairs=num_pairs,
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


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """log P(label) per position, in float32; 0 where ``labels == -100`` (no target).

    ``labels`` are already aligned with ``logits`` (position t predicts ``labels[t]``). Only the
    positions with a target are upcast to float32, never the whole ``[.., T, V]`` tensor: with
    prompts and padding excluded that is often less than half of it. ``keep``: the flat indices of
    those positions, if already known (``PreferenceBatch.targets``, built on the CPU).
    """
    flat_labels = labels.reshape(-1)
    if keep is None:
        keep = (flat_labels != -100).nonzero(as_tuple=True)[0]  # a host sync on a GPU
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, keep).float()
    picked = -F.cross_entropy(rows, flat_labels.index_select(0, keep), reduction="none")
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=logits.device)
    return out.index_put((keep,), picked).view(labels.shape)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()
