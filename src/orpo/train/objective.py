"""The objective the trainer is given: one forward for chosen + rejected, then ``orpo_loss``.

The trainer and ``evaluate`` only call ``prepare`` (CPU side, in the collate function),
``nll_tokens`` and ``__call__``; a different preference objective is another small class with
the same three methods, not another trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orpo.data.collate import PreferenceBatch
from orpo.loss import ORPOOutput, orpo_loss
from orpo.train.forward import keep_targets, token_logps


@dataclass(frozen=True)
class ORPOObjective:
    """ORPO: NLL on the chosen response (λ = ``beta`` times the odds-ratio term)."""

    beta: float = 0.1
    nll_on_prompt: bool = False

    def loss_mask(self, batch: PreferenceBatch) -> torch.Tensor:
        """Target positions whose log-prob the loss reads: responses, plus the chosen prompt if asked."""
        has_target = batch.segment_ids >= 0
        read = batch.response_mask
        if self.nll_on_prompt:
            read = read | (batch.segment_ids < batch.num_pairs)
        return has_target & read

    def nll_tokens(self, batch: PreferenceBatch) -> int:
        """Tokens this batch adds to the NLL's denominator (call on the CPU batch: no device sync)."""
        return batch.num_nll_tokens(self.nll_on_prompt)

    def prepare(self, batch: PreferenceBatch, keep_mode: str | None = None) -> PreferenceBatch:
        """Keep only the targets ``loss_mask`` reads (see ``forward.keep_targets``)."""
        return keep_targets(batch, self.loss_mask(batch), keep_mode)

    def __call__(self, model, batch: PreferenceBatch, nll_normalizer=None, or_normalizer=None) -> ORPOOutput:
        """Forward chosen and rejected rows together and compute the loss (see ``orpo_loss``)."""
        return orpo_loss(token_logps(model, batch), batch.segment_ids, batch.response_mask, batch.num_pairs,
                         beta=self.beta, nll_on_prompt=self.nll_on_prompt, nll_normalizer=nll_normalizer,
                         or_normalizer=or_normalizer)


_PAIR_MEANS = ("log_odds_ratio", "logps_chosen", "logps_rejected", "accuracy", "margin")


class MetricSums:
    """Running sums of the loss terms (token/pair weighted) over micro-batches, ranks or an eval set.

    The loss sums stay on the device (adding never syncs) and the counts, known on the CPU from
    the collated batch, stay Python ints: a whole step needs one all-reduce and one host transfer.
    Per-pair means of ``ORPOOutput`` are re-weighted by ``num_pairs``, so the final values are means
    over all pairs, not means of batch means.
    """

    _SUMS = ("nll", "or", *_PAIR_MEANS)
    _COUNTS = ("pairs", "nll_tokens", "tokens")

    def __init__(self, device: torch.device | str):
        self.sums = torch.zeros(len(self._SUMS), dtype=torch.float64, device=device)
        self.counts = [0, 0, 0]

    def add(self, out: ORPOOutput, nll_tokens: int, tokens: int) -> None:
        n = out.num_pairs
        parts = [out.nll_loss.detach(), out.or_loss.detach(), *(getattr(out, k) * n for k in _PAIR_MEANS)]
        self.sums += torch.stack(parts).to(torch.float64)
        self.counts = [self.counts[0] + n, self.counts[1] + nll_tokens, self.counts[2] + tokens]

    def reduce(self, accelerator) -> None:
        """Sum over processes (no-op on one): one all-reduce of sums and counts together."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.sums.device)
        both = accelerator.reduce(torch.cat([self.sums, counts]), reduction="sum")
        self.sums = both[: len(self._SUMS)]
        self.counts = [int(x) for x in both[len(self._SUMS) :].tolist()]

    @property
    def total_loss(self) -> torch.Tensor:
        """nll + or sums (finite iff both are): what the NaN guard looks at."""
        return self.sums[0] + self.sums[1]

    def finalize(self, beta: float, normalized: bool) -> dict[str, float]:
        """Means as Python floats (one host transfer).

        ``normalized``: the NLL/OR sums were already divided by the step's global token/pair
        counts (training); otherwise they are raw sums, divided here (evaluation).
        """
        v = dict(zip(self._SUMS, self.sums.tolist(), strict=True))
        pairs, nll_tokens, tokens = self.counts
        nll = v["nll"] if normalized else v["nll"] / max(nll_tokens, 1)
        or_ = v["or"] if normalized else v["or"] / max(pairs, 1)
        out: dict[str, float] = {"loss": nll + beta * or_, "nll_loss": nll, "or_loss": or_}
        out.update({k: v[k] / max(pairs, 1) for k in _PAIR_MEANS})
        out.update(pairs=pairs, nll_tokens=nll_tokens, tokens=tokens)
        return out
