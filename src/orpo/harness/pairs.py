"""``orpo benchmark --pairs FILE``: a preference file as a two-choice lm-eval task named ``pairs``.

The pairs are read, rendered and tokenized as ``orpo eval`` reads them (``read_pairs``,
``render_pair``, ``encode_rendered`` with the same limits), and the pairs ``orpo eval`` would drop
(a response too short, no room left, chosen and rejected the same tokens) are left out, so both
score the same pairs. Each doc: ``context`` = the rendered prompt, ``choices`` = chosen and
rejected as the template renders them, with the EOS text where orpo appends EOS (the tokenizer
reads it back as the EOS token), gold = chosen. lm-eval then tokenizes and scores them on its own
log-likelihood path.

Metrics: ``acc`` is lm-eval's (the summed log-likelihood of chosen is the larger; a tie counts
for chosen); ``acc_per_token`` is ``orpo eval``'s ``accuracy``: the length-averaged log-prob of
chosen strictly above rejected's, the token counts of each continuation taken, at build time, from
lm-eval's own encoding of it (``HFLM._encode_pair``). Where that encoding is not orpo's (a
tokenizer merging across the prompt boundary) or orpo truncated the pair (past ``max_length`` orpo
cuts the prompt from the left and each response from the right; lm-eval cuts context and
continuation together from the left), the two may differ: the count of such pairs is in the
task's metadata and the notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAIRS_TASK = "pairs"


@dataclass
class PairsTask:
    """A preference file read once (bad rows fail here, before any model loads); ``config(lm)``
    builds the task for one model's tokenizer."""

    path: str
    pairs: Any
    notes: list[str] = field(default_factory=list)
    name: str = PAIRS_TASK

    @classmethod
    def read(cls, path: str) -> PairsTask:
        from orpo.config import DataConfig
        from orpo.data.pipeline import read_pairs, source_specs

        cfg = DataConfig(train=path)
        train, _ = source_specs(cfg)
        return cls(path=path, pairs=read_pairs(cfg, train, None, seed=42).train.pairs)

    def config(self, lm, template, max_length: int) -> dict[str, Any]:
        """The lm-eval task config (a dict, docs in memory) for ``lm``'s tokenizer and ``template``."""
        import datasets

        from orpo.data import DataError
        from orpo.data.templates import render_pair
        from orpo.data.tokenize import Limits, SpecialTokens, encode_rendered

        tokenizer = lm.tokenizer
        special = SpecialTokens.of(tokenizer)
        rendered = [render_pair(p, template, tokenizer) for p in self.pairs]
        encoded = encode_rendered(rendered, tokenizer, Limits(max_length=max_length))
        docs, dropped, truncated, differ = [], 0, 0, 0
        for r, e in zip(rendered, encoded, strict=True):
            if not e.kept:
                dropped += 1
                continue
            context, choices = r.prompt, [_with_eos(r.chosen, special), _with_eos(r.rejected, special)]
            if e.truncated:
                cut = [_cut(tokenizer, r.prompt, resp, ids, n, special) for resp, ids, n in (
                    (r.chosen, e.chosen_input_ids, e.chosen_prompt_len),
                    (r.rejected, e.rejected_input_ids, e.rejected_prompt_len))]
                if cut[0] is not None and cut[1] is not None and cut[0][0] == cut[1][0]:
                    context, choices = cut[0][0], [cut[0][1], cut[1][1]]
            counts, same = [], True
            for text, ids, prompt_len in zip(choices, (e.chosen_input_ids, e.rejected_input_ids),
                                             (e.chosen_prompt_len, e.rejected_prompt_len), strict=True):
                context_enc, continuation_enc = _lm_encoding(lm, context, text)
                counts.append(len(continuation_enc))
                same = same and context_enc + continuation_enc == ids and len(context_enc) == prompt_len
            truncated += e.truncated
            differ += not same
            docs.append({"context": context, "choices": choices, "chosen_tokens": counts[0],
                         "rejected_tokens": counts[1]})
        if not docs:
            raise DataError(f"{self.path}: no pair left after tokenization (max length {max_length})")
        self.notes = [f"{self.path}: {len(docs)} pairs" + (f" ({dropped} dropped as orpo eval drops them)"
                                                            if dropped else "")]
        if truncated:
            self.notes.append(f"{truncated} pairs longer than --max-length {max_length}: cut as orpo cuts them (the "
                              "prompt from the left, each response from the right), as text")
        if differ:
            self.notes.append(f"{differ} pairs: lm-eval's tokens of prompt + response are not orpo's (a merge "
                              "across the boundary or a cut, special tokens); their scores can differ from orpo eval's")
        dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
        return {
            "task": self.name,
            "custom_dataset": lambda **_: dataset,
            "output_type": "multiple_choice",
            "test_split": "test",
            "num_fewshot": 0,
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": 0,
            "target_delimiter": "",
            "process_results": process_results,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_per_token", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1, "source": self.path, "template": template.name, "max_length": max_length,
                         "pairs": len(docs), "dropped": dropped, "truncated": truncated,
                         "token_mismatches": differ},
        }


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """``acc`` as lm-eval scores multiple choice (argmax of the summed log-likelihoods, first on a
    tie) and ``acc_per_token`` as orpo's accuracy (per-token means, chosen strictly higher)."""
    chosen, rejected = (float(r[0]) if isinstance(r, tuple | list) else float(r) for r in results)
    per_token = chosen / max(doc["chosen_tokens"], 1) > rejected / max(doc["rejected_tokens"], 1)
    return {"acc": float(chosen >= rejected), "acc_per_token": float(per_token)}


def _with_eos(response: str, special) -> str:
    """The response as orpo tokenizes it: EOS appended unless it already ends with it."""
    if special.eos_id is None or response.endswith(special.eos_text):
        return response
    return response + special.eos_text


def _cut(tokenizer, prompt: str, response: str, ids: list[int], prompt_len: int,
         special) -> tuple[str, str] | None:
    """orpo's cut of a long sequence (``tokenize.truncate_pair``: ``ids``, ``prompt_len``) as text:
    the prompt from its first kept token, the response to its last; None without a fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    full = prompt + response
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    bound = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(offsets))
    added = ids[:1] == [special.bos_id] and not prompt.startswith(special.bos_text)
    in_text = ids[:1] == [special.bos_id] and not added
    first = bound - (prompt_len - (1 if added or in_text else 0))
    start = offsets[first][0] if first < len(offsets) else len(prompt)
    context = (special.bos_text if in_text else "") + full[start : len(prompt)]
    whole = _with_eos(response, special)
    kept = len(ids) - prompt_len
    if kept >= len(offsets) - bound + (whole != response):
        return context, whole
    end = offsets[bound + kept - 1][1] if kept > 0 else len(prompt)
    return context, full[len(prompt) : end]


def _lm_encoding(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """How lm-eval's ``loglikelihood`` encodes a request (an empty context: its prefix token)."""
    if context:
        return lm._encode_pair(context, continuation)
    return [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
