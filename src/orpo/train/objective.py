"""Objectives: what the trainer and ``evaluate`` optimize and report, one small class each.

An objective has three methods: ``prepare`` (CPU side, in the collate function: keep only the
targets it reads), ``nll_tokens`` (the batch's NLL denominator, known on the CPU) and ``__call__``
(one forward for chosen + rejected, then its math). It declares its loss as weighted ``terms``,
each a sum over the batch normalized per NLL token or per pair, so the trainer, the metric sums
and the logs never need to know which objective runs: a new objective is one new class here, not
edits across the trainer, evaluation and logging.

The objectives here read both responses (``ReadsResponses``) and state their math once, as
``sums(PairLogps, pair_values)``: the term sums and their own per-pair metrics. Every term is a
sum over pairs and the normalizers are the step's, so the same function gives the loss of any
subset of pairs: ``forward.pair_loss`` runs it per chunk of whole pairs inside the chunked head
(the gradient computed while the chunk's logits exist), or once on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch

from orpo.config import OrpoConfig
from orpo.data.collate import PreferenceBatch
from orpo.loss import PairLogps, cpo_loss, dpo_loss, log_odds, odds_ratio_loss, pair_logps, simpo_loss
from orpo.train.forward import keep_targets, pair_loss, token_logps

Per = Literal["token", "pair"]

# Per-pair means every objective reports, under the same names (the metrics.jsonl contract).
SHARED_PAIR_METRICS = ("logps_chosen", "logps_rejected", "accuracy", "margin")


@dataclass(frozen=True)
class LossTerm:
    """One summand of a loss: ``weight · (sum over the batch) / (NLL tokens or pairs of the step)``."""

    name: str
    weight: float
    per: Per


@dataclass
class ObjectiveOutput:
    """The loss to backpropagate and the detached sums the metrics are made of.

    ``loss`` is already divided by the normalizers ``__call__`` was given (the counts of the whole
    optimizer step), so the micro-batches of one step add up to the step's loss. ``term_sums`` and
    ``pair_sums`` are raw sums over this batch; ``MetricSums`` divides them by the global counts.
    """

    loss: torch.Tensor
    term_sums: dict[str, torch.Tensor]
    pair_sums: dict[str, torch.Tensor]
    num_pairs: int


class Objective(Protocol):
    """What the trainer, ``evaluate`` and the logs need from an objective."""

    @property
    def name(self) -> str: ...

    @property
    def terms(self) -> tuple[LossTerm, ...]: ...

    @property
    def pair_metrics(self) -> tuple[str, ...]: ...

    def prepare(self, batch: PreferenceBatch, keep_mode: str | None = None) -> PreferenceBatch: ...

    def nll_tokens(self, batch: PreferenceBatch) -> int: ...

    def __call__(self, model, batch: PreferenceBatch, token_normalizer=None,
                 pair_normalizer=None) -> ObjectiveOutput: ...


def weighted(terms: tuple[LossTerm, ...], term_sums: dict[str, torch.Tensor], norms: dict[str, torch.Tensor | float]
             ) -> torch.Tensor:
    """``Σ weight · sum / normalizer`` over the terms; a term of weight 0 is reported, not optimized
    (e.g. the NLL of SimPO and DPO)."""
    loss = sum((t.weight * term_sums[t.name] / norms[t.per] for t in terms if t.weight),
               torch.zeros((), device=next(iter(term_sums.values())).device))
    assert isinstance(loss, torch.Tensor)
    return loss


def combine(loss: torch.Tensor, term_sums: dict[str, torch.Tensor], logps: PairLogps,
            own_pair_metrics: dict[str, torch.Tensor]) -> ObjectiveOutput:
    """The part every objective shares: the shared pair metrics, everything but the loss detached.

    The per-pair metrics are summed, not averaged, so ``MetricSums`` can weight every pair the
    same across micro-batches, ranks and eval batches.
    """
    with torch.no_grad():
        c, r = logps.chosen, logps.rejected
        pair_sums = {"logps_chosen": c.sum(), "logps_rejected": r.sum(), "accuracy": (c > r).float().sum(),
                     "margin": (c - r).sum()}
        pair_sums.update({k: v.detach().sum() for k, v in own_pair_metrics.items()})
    return ObjectiveOutput(loss=loss, term_sums={k: v.detach() for k, v in term_sums.items()},
                           pair_sums=pair_sums, num_pairs=logps.num_pairs)


class ReadsResponses:
    """``prepare`` / ``nll_tokens`` for objectives that read both responses (and the chosen prompt if asked)."""

    nll_on_prompt: bool

    def loss_mask(self, batch: PreferenceBatch) -> torch.Tensor:
        """Target positions whose log-prob the loss reads: responses, plus the chosen prompt if asked."""
        has_target = batch.segment_ids >= 0
        read = batch.response_mask
        if self.nll_on_prompt:
            read = read | (batch.segment_ids < batch.num_pairs)
        return has_target & read

    def nll_tokens(self, batch: PreferenceBatch) -> int:
        """Tokens this batch adds to the NLL's denominator, counted by ``prepare`` on the CPU (no device sync)."""
        return batch.nll_tokens if batch.nll_tokens is not None else batch.num_nll_tokens(self.nll_on_prompt)

    def prepare(self, batch: PreferenceBatch, keep_mode: str | None = None) -> PreferenceBatch:
        """Keep only the targets ``loss_mask`` reads (see ``forward.keep_targets``) and count the NLL's."""
        kept = keep_targets(batch, self.loss_mask(batch), keep_mode)
        return replace(kept, nll_tokens=kept.num_nll_tokens(self.nll_on_prompt))

    def pair_logps(self, model, batch: PreferenceBatch) -> PairLogps:
        """One forward of chosen and rejected rows together, reduced to per-pair log-probs."""
        return pair_logps(token_logps(model, batch), batch.segment_ids, batch.response_mask, batch.num_pairs,
                          self.nll_on_prompt)

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        """The weighted terms ``sums`` returns (a property or a field of each objective)."""
        raise NotImplementedError

    def sums(self, lp: PairLogps, values: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The objective's math: its term sums and own per-pair metrics over the pairs of ``lp``."""
        raise NotImplementedError

    def __call__(self, model, batch: PreferenceBatch, token_normalizer=None, pair_normalizer=None) -> ObjectiveOutput:
        """One forward of chosen and rejected rows together, the loss normalized by the step's counts
        (default: this batch's own, known on the CPU), the metrics from the same log-probs."""
        norms = {"token": token_normalizer if token_normalizer is not None else max(self.nll_tokens(batch), 1),
                 "pair": pair_normalizer if pair_normalizer is not None else max(batch.num_pairs, 1)}

        def loss_of(lp: PairLogps, values: dict[str, torch.Tensor]) -> torch.Tensor:
            return weighted(self.terms, self.sums(lp, values)[0], norms)

        loss, lp = pair_loss(model, batch, loss_of, self.nll_on_prompt)
        with torch.no_grad():
            term_sums, own = self.sums(lp, batch.pair_values)
        return combine(loss, term_sums, lp, own)


# Every objective also reports the quantity ORPO optimizes, so runs of different objectives compare.
PREFERENCE_METRICS = (*SHARED_PAIR_METRICS, "log_odds_ratio")


def log_odds_ratio(lp: PairLogps) -> torch.Tensor:
    """Per-pair ``log odds(chosen) − log odds(rejected)`` (detached: a metric)."""
    with torch.no_grad():
        return log_odds(lp.chosen) - log_odds(lp.rejected)


@dataclass(frozen=True)
class ORPOObjective(ReadsResponses):
    """ORPO: NLL on the chosen response + λ (``beta``) × the odds-ratio term (see ``orpo.loss``)."""

    beta: float = 0.1
    nll_on_prompt: bool = False
    name: str = field(default="orpo", init=False)

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        return (LossTerm("nll_loss", 1.0, "token"), LossTerm("or_loss", self.beta, "pair"))

    @property
    def pair_metrics(self) -> tuple[str, ...]:
        return PREFERENCE_METRICS

    def sums(self, lp: PairLogps, values: dict[str, torch.Tensor]):
        """``Σ −log P`` over the NLL's targets and ``Σ −log σ(log odds ratio)`` (λ: the or_loss weight)."""
        sums = {"nll_loss": lp.nll_sum, "or_loss": odds_ratio_loss(lp.chosen, lp.rejected).sum()}
        return sums, {"log_odds_ratio": log_odds_ratio(lp)}


@dataclass(frozen=True)
class SFTObjective(ReadsResponses):
    """SFT: the NLL of the chosen response only (ORPO with λ = 0); rejected is forwarded for the metrics."""

    nll_on_prompt: bool = False
    name: str = field(default="sft", init=False)
    terms: tuple[LossTerm, ...] = field(default=(LossTerm("nll_loss", 1.0, "token"),), init=False)
    pair_metrics: tuple[str, ...] = field(default=PREFERENCE_METRICS, init=False)

    def sums(self, lp: PairLogps, values: dict[str, torch.Tensor]):
        return {"nll_loss": lp.nll_sum}, {"log_odds_ratio": log_odds_ratio(lp)}


@dataclass(frozen=True)
class SimPOObjective(ReadsResponses):
    """SimPO (Meng et al. 2024): ``−log σ(β·(logp̄_c − logp̄_r) − γ)``, plus ``nll_weight`` × NLL if asked."""

    beta: float = 2.0
    gamma: float = 0.5
    nll_weight: float = 0.0
    nll_on_prompt: bool = False
    name: str = field(default="simpo", init=False)
    pair_metrics: tuple[str, ...] = field(default=PREFERENCE_METRICS, init=False)

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        return (LossTerm("nll_loss", self.nll_weight, "token"), LossTerm("simpo_loss", 1.0, "pair"))

    def sums(self, lp: PairLogps, values: dict[str, torch.Tensor]):
        sums = {"nll_loss": lp.nll_sum, "simpo_loss": simpo_loss(lp.chosen, lp.rejected, self.beta, self.gamma).sum()}
        return sums, {"log_odds_ratio": log_odds_ratio(lp)}


@dataclass(frozen=True)
class CPOObjective(ReadsResponses):
    """CPO (Xu et al. 2024): NLL on chosen + ``−log σ(β·(log π_c − log π_r))`` on summed log-probs."""

    beta: float = 0.1
    nll_on_prompt: bool = False
    name: str = field(default="cpo", init=False)
    pair_metrics: tuple[str, ...] = field(default=PREFERENCE_METRICS, init=False)
    terms: tuple[LossTerm, ...] = field(
        default=(LossTerm("nll_loss", 1.0, "token"), LossTerm("cpo_loss", 1.0, "pair")), init=False)

    def sums(self, lp: PairLogps, values: dict[str, torch.Tensor]):
        sums = {"nll_loss": lp.nll_sum, "cpo_loss": cpo_loss(lp.chosen_sum, lp.rejected_sum, self.beta).sum()}
        return sums, {"log_odds_ratio": log_odds_ratio(lp)}


# The batch's per-pair values (``PreferenceBatch.pair_values``) DPO reads: summed response
# log-probs of the starting weights, computed once before training (``orpo.train.reference``).
REFERENCE_COLUMNS = ("ref_chosen_sum", "ref_rejected_sum")


@dataclass(frozen=True)
class DPOObjective(ReadsResponses):
    """DPO (Rafailov et al. 2023) with one model in memory: the reference log-probs ride in the batch.

    ``reward_margin`` is DPO's implicit reward margin ``β·((log π_c − log π_ref,c) − (log π_r − log π_ref,r))``;
    the NLL is reported, not optimized.
    """

    beta: float = 0.1
    nll_on_prompt: bool = False
    name: str = field(default="dpo", init=False)
    reference_columns: tuple[str, ...] = field(default=REFERENCE_COLUMNS, init=False)
    pair_metrics: tuple[str, ...] = field(default=(*PREFERENCE_METRICS, "reward_margin"), init=False)
    terms: tuple[LossTerm, ...] = field(
        default=(LossTerm("nll_loss", 0.0, "token"), LossTerm("dpo_loss", 1.0, "pair")), init=False)

    def __call__(self, model, batch: PreferenceBatch, token_normalizer=None, pair_normalizer=None) -> ObjectiveOutput:
        missing = [k for k in REFERENCE_COLUMNS if k not in batch.pair_values]
        if missing:  # said before the forward, not from inside the chunked head
            raise ValueError(f"objective dpo needs the reference log-probs {missing} in the batch's pair_values "
                             "(the trainer adds them; see orpo.train.reference.add_reference_logps)")
        return super().__call__(model, batch, token_normalizer, pair_normalizer)

    def sums(self, lp: PairLogps, values: dict[str, torch.Tensor]):
        """The reference log-probs are the pairs' own ``values`` (constants: no gradient)."""
        ref_c, ref_r = (values[k] for k in REFERENCE_COLUMNS)
        per_pair = dpo_loss(lp.chosen_sum, lp.rejected_sum, ref_c, ref_r, self.beta)
        with torch.no_grad():
            reward_margin = self.beta * ((lp.chosen_sum - ref_c) - (lp.rejected_sum - ref_r))
        return ({"nll_loss": lp.nll_sum, "dpo_loss": per_pair.sum()},
                {"log_odds_ratio": log_odds_ratio(lp), "reward_margin": reward_margin})


def build_objective(cfg: OrpoConfig) -> Objective:
    """The objective the ``orpo`` config section asks for (``orpo.objective``)."""
    if cfg.objective == "sft":
        return SFTObjective(nll_on_prompt=cfg.nll_on_prompt)
    if cfg.objective == "simpo":
        return SimPOObjective(beta=cfg.simpo_beta, gamma=cfg.simpo_gamma, nll_weight=cfg.simpo_nll_weight,
                              nll_on_prompt=cfg.nll_on_prompt)
    if cfg.objective == "cpo":
        return CPOObjective(beta=cfg.cpo_beta, nll_on_prompt=cfg.nll_on_prompt)
    if cfg.objective == "dpo":
        return DPOObjective(beta=cfg.dpo_beta, nll_on_prompt=cfg.nll_on_prompt)
    return ORPOObjective(beta=cfg.beta, nll_on_prompt=cfg.nll_on_prompt)


def loss_from_means(terms: tuple[LossTerm, ...], means: dict[str, float]) -> float:
    """The loss an objective's weighted terms add up to, from the terms' means."""
    return sum(t.weight * means[t.name] for t in terms)


class MetricSums:
    """Running sums of an objective's terms and pair metrics over micro-batches, ranks or an eval set.

    The sums stay on the device (adding never syncs) and the counts, known on the CPU from the
    collated batch, stay Python ints: a whole step needs one all-reduce and one host transfer.
    Everything is summed raw and divided by the global counts at the end, so the values are means
    over all tokens / pairs, never means of batch means.
    """

    COUNTS = ("pairs", "nll_tokens", "tokens")

    def __init__(self, objective: Objective, device: torch.device | str):
        self.terms = objective.terms
        self.keys = [t.name for t in self.terms] + list(objective.pair_metrics)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self._counts = [0, 0, 0]
        self._reduced_counts: torch.Tensor | None = None

    def add(self, out: ObjectiveOutput, nll_tokens: int, tokens: int) -> None:
        values = {**out.term_sums, **out.pair_sums}
        self.sums += torch.stack([values[k].to(self.sums.device) for k in self.keys]).to(torch.float64)
        c = self._counts
        self._counts = [c[0] + out.num_pairs, c[1] + nll_tokens, c[2] + tokens]

    def reduce(self, accelerator) -> None:
        """Sum over processes (no-op on one): one all-reduce of sums and counts together.

        The global counts stay on the device until read (``counts``), or until the caller reads
        them back with its own transfer (``unread_counts`` + ``settle``), so reducing never syncs.
        """
        if accelerator is None or accelerator.num_processes == 1:
            return
        counts = torch.tensor(self._counts, dtype=torch.float64).to(self.sums.device, non_blocking=True)
        both = accelerator.reduce(torch.cat([self.sums, counts]), reduction="sum")
        self.sums, self._reduced_counts = both[: len(self.keys)], both[len(self.keys) :]

    def unread_counts(self) -> torch.Tensor:
        """The reduced counts still on the device (empty if there are none), for a caller's one readback."""
        if self._reduced_counts is None:
            return self.sums.new_zeros(0)
        return self._reduced_counts

    def settle(self, counts: list[float]) -> None:
        """Take the values of ``unread_counts`` the caller read back."""
        if self._reduced_counts is not None:
            self._counts, self._reduced_counts = [int(x) for x in counts], None

    @property
    def counts(self) -> list[int]:
        """Pairs, response tokens the NLL averages over, and real tokens (over all processes once reduced)."""
        if self._reduced_counts is not None:
            self.settle(self._reduced_counts.tolist())  # a host sync, unless the caller settled them
        return self._counts

    @property
    def total_loss(self) -> torch.Tensor:
        """Sum of the term sums (finite iff every term is): what the NaN guard looks at."""
        return self.sums[: len(self.terms)].sum()

    def finalize(self) -> dict[str, float]:
        """``loss``, each term's mean, each pair metric's mean and the counts, as Python floats."""
        v = dict(zip(self.keys, self.sums.tolist(), strict=True))
        pairs, nll_tokens, tokens = self.counts
        den = {"token": max(nll_tokens, 1), "pair": max(pairs, 1)}
        terms = {t.name: v[t.name] / den[t.per] for t in self.terms}
        out: dict[str, float] = {"loss": loss_from_means(self.terms, terms), **terms}
        out.update({k: v[k] / max(pairs, 1) for k in self.keys[len(self.terms) :]})
        out.update(pairs=pairs, nll_tokens=nll_tokens, tokens=tokens)
        return out
