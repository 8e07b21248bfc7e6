"""What ranks a prompt's samples for ``best-vs-worst``: a reward model, or the IFEval checks.

A scorer gives one number per (prompt, response), higher better. (A judge compares two answers
instead of scoring one; it is the ``judge-pairwise`` strategy, in build.py.)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from orpo.data.formats import Message, Pair
from orpo.pairs.demos import Demo


class Scorer(Protocol):
    name: str

    def score(self, demos: list[Demo], responses: list[str]) -> list[float]: ...


class RewardModel:
    """``AutoModelForSequenceClassification`` with one label: prompt + response (its tokenizer's chat
    template when it has one, else plain text, as training joins them) -> the logit."""

    def __init__(self, name: str, *, max_length: int | None = None, trust_remote_code: bool = False,
                 revision: str | None = None) -> None:
        from dataclasses import replace

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from orpo.loading import cli_source, load

        source = cli_source(name, "--reward-model", "model", revision=revision, flags=True)
        self.model = load(AutoModelForSequenceClassification.from_pretrained, source,
                          trust_remote_code=trust_remote_code).to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.tokenizer = load(AutoTokenizer.from_pretrained, replace(source, want="tokenizer"),
                              trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # a long text loses the start of its prompt, never the response being scored
        self.tokenizer.truncation_side = "left"
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None) or 1024
        self.name = f"reward-model:{name}"

    def text(self, prompt: str | list[Message], response: str) -> str:
        from orpo.data.templates import ChatTemplate, chat_messages, render_pair

        pair = Pair(prompt=prompt, chosen=response, rejected=response)
        if getattr(self.tokenizer, "chat_template", None):
            messages, chosen, _ = chat_messages(pair)
            return self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": chosen}],
                                                      tokenize=False)
        # plain text, joined as training joins it (the sample already starts with its space)
        rendered = render_pair(pair, ChatTemplate(name="none", jinja=None), self.tokenizer)
        return rendered.prompt + rendered.chosen

    @torch.no_grad()
    def score(self, demos: list[Demo], responses: list[str]) -> list[float]:
        """One forward per text, unpadded: a batch's shape changes the float rounding of every score in it,
        and a score must not depend on its batch mates (--batch-size, a resumed run's batches). Scoring
        is one forward a sample, far cheaper than generating it."""
        out: list[float] = []
        for d, r in zip(demos, responses, strict=True):
            batch = self.tokenizer(self.text(d.prompt, r), return_tensors="pt", truncation=True,
                                   max_length=self.max_length)
            out.append(float(self.model(**batch.to(self.model.device)).logits[0, 0].float()))
        return out


class IfevalChecks:
    """The share of a prompt's IFEval instructions the response follows (strict), from 0 to 1."""

    name = "verify:ifeval"

    def __init__(self) -> None:
        from orpo.harness.ifeval import ensure_punkt

        ensure_punkt()

    def score(self, demos: list[Demo], responses: list[str]) -> list[float]:
        from orpo.harness.ifeval import check_ifeval

        out = []
        for d, r in zip(demos, responses, strict=True):
            row: dict[str, Any] = d.ifeval or {}
            out.append(float(check_ifeval(row, r).strict_score))
        return out
