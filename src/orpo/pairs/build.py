"""The strategies: from a batch of demonstrations to finished rows (a pair, or why none), and the summary.

- ``reference-vs-sample`` (SPIN): chosen = the demonstration's response, rejected = one sample.
- ``best-vs-worst``: K samples scored; chosen = best, rejected = worst; a gap below ``--min-gap``
  (or none: every score equal) drops the row.
- ``judge-pairwise``: two samples judged in both orders; a tie (or a disagreement) drops the row.

Every row's outcome is recorded, kept or not, so the summary counts drops by reason and a resumed
run knows the row is done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from orpo.data.formats import Message
from orpo.pairs.demos import Demo
from orpo.pairs.sampling import SampleSpec, sample_seed
from orpo.pairs.scorers import Scorer


class Generator(Protocol):
    name: str

    def sample(self, prompts: list[str | list[Message]], seeds: list[int], spec: SampleSpec) -> list[str]: ...


@dataclass
class Plan:
    """What decides the pairs (the progress file's header holds it)."""

    strategy: str
    samples: int
    seed: int
    spec: SampleSpec
    min_gap: float
    source: str
    generator: Generator
    scorer: Scorer | None = None
    judge: Any = None

    @property
    def scorer_name(self) -> str | None:
        if self.judge is not None:
            return f"judge:{self.judge.name}"
        return self.scorer.name if self.scorer is not None else None


def run_batch(plan: Plan, demos: list[Demo]) -> list[dict[str, Any]]:
    """The finished-row entries of ``demos`` (one each, in order)."""
    k = 1 if plan.strategy == "reference-vs-sample" else plan.samples
    jobs = [(d, j) for d in demos for j in range(k)]
    seeds = [sample_seed(plan.seed, d.index, j) for d, j in jobs]
    texts = plan.generator.sample([d.prompt for d, _ in jobs], seeds, plan.spec)
    per_row = [texts[i * k:(i + 1) * k] for i in range(len(demos))]
    row_seeds = [seeds[i * k:(i + 1) * k] for i in range(len(demos))]
    decide: Callable[[Plan, list[Demo], list[list[str]]], list[tuple]] = DECIDERS[plan.strategy]
    entries = []
    for d, samples, s, (chosen, rejected, scores, dropped, gap) in zip(
            demos, per_row, row_seeds, decide(plan, demos, per_row), strict=True):
        entry: dict[str, Any] = {"row": d.index, "generations": len(samples), "dropped": dropped, "gap": gap}
        if dropped is None:
            entry["pair"] = output_row(plan, d, chosen, rejected, scores, s)
        entries.append(entry)
    return entries


def _reference(plan: Plan, demos: list[Demo], samples: list[list[str]]) -> list[tuple]:
    out: list[tuple] = []
    refs = [d.response or "" for d in demos]
    # a text prompt's sample starts as its reference does (" " after HH's "Assistant:", or not), so
    # the pair never differs by a leading space, a shortcut the loss would learn
    sampled = [_lead(r) + s[0].lstrip() if isinstance(d.prompt, str) else s[0]
               for d, r, s in zip(demos, refs, samples, strict=True)]
    scores: list[Any] = [None] * len(demos)
    if plan.scorer is not None:
        values = plan.scorer.score(demos + demos, refs + sampled)
        scores = [{"chosen": c, "rejected": r} for c, r in zip(values[:len(demos)], values[len(demos):], strict=True)]
    for ref, sample, score in zip(refs, sampled, scores, strict=True):
        gap = score["chosen"] - score["rejected"] if score else None
        dropped = "empty sample" if not sample.strip() else "identical texts" if sample.strip() == ref.strip() else None
        out.append((ref, sample, score, dropped, gap))
    return out


def _best_vs_worst(plan: Plan, demos: list[Demo], samples: list[list[str]]) -> list[tuple]:
    assert plan.scorer is not None
    flat_demos = [d for d, s in zip(demos, samples, strict=True) for _ in s]
    flat = [t for s in samples for t in s]
    values = plan.scorer.score(flat_demos, flat)
    out: list[tuple] = []
    at = 0
    for s in samples:
        scored = list(zip(s, values[at:at + len(s)], strict=True))
        at += len(s)
        candidates = [(t, v) for t, v in scored if t.strip()]
        if len({t.strip() for t, _ in candidates}) < 2:
            out.append((None, None, None, "empty sample" if len(candidates) < 2 else "identical texts", None))
            continue
        # the first best and the last worst, so equal scores never pick one text twice
        best = max(candidates, key=lambda tv: tv[1])
        worst = min(reversed(candidates), key=lambda tv: tv[1])
        gap = best[1] - worst[1]
        all_scores = [v for _, v in scored]
        score = {"chosen": best[1], "rejected": worst[1], "samples": all_scores}
        dropped = "score tie" if gap <= 0 else "score gap below --min-gap" if gap < plan.min_gap else None
        out.append((best[0], worst[0], score, dropped, gap))
    return out


def _judge_pairwise(plan: Plan, demos: list[Demo], samples: list[list[str]]) -> list[tuple]:
    from orpo.data.templates import _plain_prompt
    from orpo.judge import judge_both_orders

    out: list[tuple | None] = [None] * len(demos)
    ask = []
    for i, s in enumerate(samples):
        if not s[0].strip() or not s[1].strip():
            out[i] = (None, None, None, "empty sample", None)
        elif s[0].strip() == s[1].strip():
            out[i] = (None, None, None, "identical texts", None)
        else:
            ask.append(i)
    verdicts = judge_both_orders(plan.judge, [_plain_prompt(demos[i].prompt) for i in ask],
                                 [samples[i][0] for i in ask], [samples[i][1] for i in ask]) if ask else []
    for i, v in zip(ask, verdicts, strict=True):
        score = {"outcome": v.outcome, "forward": v.forward.winner, "backward": v.backward.winner}
        first, second = samples[i]
        if v.outcome == "tie":
            # a reply with no verdict in it is a tie too, counted apart: a judge that never answers in
            # the format is a setup to fix, not a close call
            unparsed = not (v.forward.parsed and v.backward.parsed)
            out[i] = (None, None, score, "judge reply without a verdict" if unparsed else "judge tie", None)
        else:
            chosen, rejected = (first, second) if v.outcome == "first" else (second, first)
            out[i] = (chosen, rejected, {**score, "chosen_sample": 0 if v.outcome == "first" else 1}, None, None)
    return [o for o in out if o is not None]


def _lead(text: str) -> str:
    return text[:len(text) - len(text.lstrip())]


DECIDERS = {"reference-vs-sample": _reference, "best-vs-worst": _best_vs_worst, "judge-pairwise": _judge_pairwise}


def output_row(plan: Plan, demo: Demo, chosen: str, rejected: str, scores: Any, seeds: list[int]) -> dict[str, Any]:
    """A standard-format row (``orpo train`` reads it as is), traced: scores, generator, scorer, seed, source row.

    A message-list prompt gets one-message responses, the conversational format training reads.
    """
    pair: dict[str, Any] = {"prompt": demo.prompt, "chosen": chosen, "rejected": rejected}
    if isinstance(demo.prompt, list):
        pair["chosen"] = [{"role": "assistant", "content": chosen}]
        pair["rejected"] = [{"role": "assistant", "content": rejected}]
    return {**pair, "scores": scores, "strategy": plan.strategy, "generator": plan.generator.name,
            "scorer": plan.scorer_name, "seed": plan.seed, "sample_seeds": seeds,
            "source": {"file": plan.source, "row": demo.number}}


@dataclass
class PairsSummary:
    """What ``orpo pairs`` made: pairs kept, rows dropped by reason, score gaps, the length bias."""

    rows: int
    kept: int
    dropped: dict[str, int]
    rows_resumed: int
    samples_generated: int
    score_gap: dict[str, float] | None
    chosen_longer_share: float | None
    out: str
    seconds: float = 0.0
    audit: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"orpo pairs: {self.kept} pairs of {self.rows} rows written to {self.out} "
                 f"({self.samples_generated} samples generated in {self.seconds:.1f} s"
                 + (f"; {self.rows_resumed} rows done before, resumed" if self.rows_resumed else "") + ")"]
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped, {reason}: {n}")
        if self.score_gap:
            lines.append("  score gap: " + "  ".join(f"{k} {v:.4g}" for k, v in self.score_gap.items()))
        if self.chosen_longer_share is not None:
            lines.append(f"  chosen longer than rejected: {self.chosen_longer_share:.1%} of pairs")
        return "\n".join(lines)


def summarize(entries: list[dict[str, Any]], *, resumed: int, generated: int, out: str,
              skipped: dict[str, int] | None = None) -> PairsSummary:
    """``skipped``: source rows read but not used, as training skips them (by kind)."""
    kept = [e["pair"] for e in entries if e.get("dropped") is None]
    dropped = Counter(e["dropped"] for e in entries if e.get("dropped") is not None)
    for kind, n in (skipped or {}).items():
        dropped[f"source row: {kind}"] += n
    gaps = sorted(e["gap"] for e in entries if e.get("dropped") is None and e.get("gap") is not None)
    gap = None
    if gaps:
        gap = {"min": gaps[0], "p10": _pct(gaps, 0.1), "p50": _pct(gaps, 0.5), "p90": _pct(gaps, 0.9),
               "max": gaps[-1]}
    longer = None
    if kept:
        longer = sum(len(_text(p["chosen"])) > len(_text(p["rejected"])) for p in kept) / len(kept)
    return PairsSummary(rows=len(entries) + sum((skipped or {}).values()), kept=len(kept), dropped=dict(dropped), rows_resumed=resumed,
                        samples_generated=generated, score_gap=gap, chosen_longer_share=longer, out=out)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _text(response: Any) -> str:
    return response if isinstance(response, str) else response[0]["content"]
