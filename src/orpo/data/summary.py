"""What ``prepare_data`` reports about the data: token-length percentiles, drops by reason, the
checks' findings (``DataSummary``, printed at the start of every run and cached with the tokens)."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LENGTH_KEYS = ("prompt", "chosen", "rejected", "sequence")


PERCENTILES = (50, 90, 99)


@dataclass
class LengthStats:
    """Untruncated token lengths: percentiles are observed values (``method="higher"``)."""

    p50: int
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, values: np.ndarray) -> LengthStats:
        if values.size == 0:
            return cls(0, 0, 0, 0)
        p50, p90, p99 = (int(np.percentile(values, q, method="higher")) for q in PERCENTILES)
        return cls(p50=p50, p90=p90, p99=p99, max=int(values.max()))


@dataclass
class DataSummary:
    """What happened to the data, for the user: counts, drops by reason, lengths, truncation."""

    source: str
    eval_source: str | None
    format: str
    template: str
    max_length: int
    prompt_budget: int | None  # None: adaptive (see tokenize.py)
    rows_read: int
    pairs: int  # valid pairs (after bad rows and max_samples), before tokenization
    kept: int
    train_size: int
    eval_size: int
    dropped: dict[str, int]  # reason -> count; bad rows too ("bad row: <kind>")
    truncated: int  # kept pairs with a cut prompt or response
    lengths: dict[str, LengthStats]  # prompt / chosen / rejected response / longest sequence
    first_errors: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source of a mixture (source_counts)
    checks: dict[str, Any] = field(default_factory=dict)  # the cheap data checks (run_checks)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSummary:
        d = dict(d)
        d["lengths"] = {k: LengthStats(**v) for k, v in d["lengths"].items()}
        return cls(**d)

    def render(self) -> str:
        """One screen of text (rich tables, no colour codes)."""
        from rich.console import Console
        from rich.table import Table

        counts = Table(title="Preference data", show_header=False, title_justify="left")
        counts.add_column(style="bold")
        counts.add_column()
        src = self.source + (f"  (eval: {self.eval_source})" if self.eval_source else "")
        counts.add_row("source", src)
        counts.add_row("format / template", f"{self.format} / {self.template}")
        counts.add_row("rows read", str(self.rows_read))
        counts.add_row("pairs", str(self.pairs))
        counts.add_row("kept", f"{self.kept}  (train {self.train_size}, eval {self.eval_size})")
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        counts.add_row("dropped", f"{self.num_dropped}" + (f"  ({drops})" if drops else ""))
        counts.add_row(
            "truncated", f"{self.truncated}  (max_length {self.max_length}, prompt budget "
            f"{self.prompt_budget if self.prompt_budget is not None else 'auto: >= max_length/2'})"
        )
        for err in self.first_errors:
            counts.add_row("bad row", err)

        lengths = Table(title="Token lengths before truncation", title_justify="left")
        lengths.add_column("")
        for name in ("p50", "p90", "p99", "max"):
            lengths.add_column(name, justify="right")
        labels = {"prompt": "prompt", "chosen": "chosen response", "rejected": "rejected response",
                  "sequence": "longest sequence"}
        for key in LENGTH_KEYS:
            s = self.lengths[key]
            lengths.add_row(labels[key], str(s.p50), str(s.p90), str(s.p99), str(s.max))

        out = io.StringIO()
        console = Console(file=out, width=110, color_system=None, force_terminal=False)
        console.print(counts)
        if self.sources:
            mix = Table(title="Mixture", title_justify="left")
            for name in ("source", "format", "rows read", "pairs", "mixed in", "kept"):
                mix.add_column(name, justify="left" if name in ("source", "format") else "right")
            for c in self.sources:
                mix.add_row(c["name"], c["format"], *(str(c[k]) for k in ("rows_read", "pairs", "mixed", "kept")))
            console.print(mix)
        console.print(lengths)
        checks = render_checks(self.checks, self.pairs, eval_pairs=self.eval_size)
        if checks is not None:
            console.print(checks)
        return out.getvalue().rstrip()


def length_stats(stats: dict[str, np.ndarray]) -> dict[str, LengthStats]:
    prompt, chosen, rejected = stats["prompt_tokens"], stats["chosen_tokens"], stats["rejected_tokens"]
    return {
        "prompt": LengthStats.of(prompt),
        "chosen": LengthStats.of(chosen),
        "rejected": LengthStats.of(rejected),
        "sequence": LengthStats.of(prompt + np.maximum(chosen, rejected)),
    }


CHECK_LABELS = {
    "duplicates": "duplicate pairs",
    "identical_pairs": "chosen == rejected",
    "conflicting_pairs": "conflicting (swapped)",
    "near_identical_pairs": "near-identical (<5% chars)",
    "empty_responses": "empty responses",
    "template_leaks": "template markup in responses",
    "control_chars": "control characters",
    "dropped_by_truncation": "dropped by truncation",
    "eval_prompt_overlap": "eval prompts also in train",
}


def render_checks(checks: dict[str, Any], pairs: int, only_found: bool = True, title: str = "Data checks",
                  eval_pairs: int | None = None):
    """The checks as a rich table: each finding with its count, share and example rows; None if empty.

    Shares are of ``pairs``; the eval overlap's is of ``eval_pairs`` (the rows it counts are eval rows).
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("check")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    table.add_column("examples")
    for key, label in CHECK_LABELS.items():
        found = checks.get(key)
        if found is None or (only_found and not found["count"]):
            continue
        of = eval_pairs if key == "eval_prompt_overlap" and eval_pairs else pairs
        table.add_row(label, str(found["count"]), f"{found['count'] / max(of, 1):.1%}",
                      ", ".join(str(x) for x in found["examples"]))
    if "chosen_longer_share" in checks:
        unit = checks["length_unit"]
        table.add_row("chosen longer", "", f"{checks['chosen_longer_share']:.1%}",
                      f"mean {unit}: chosen {checks['mean_chosen_length']:.1f}, rejected "
                      f"{checks['mean_rejected_length']:.1f}")
    if checks.get("truncated_share") is not None:
        table.add_row("truncated", "", f"{checks['truncated_share']:.1%}", "a prompt or response cut to max_length")
    return table if table.row_count else None
