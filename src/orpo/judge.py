"""A judge that says which of two answers to a question is better: a local model or a served one.

The prompt follows the pairwise design of MT-Bench's judge (Zheng et al. 2023, "Judging LLM-as-a-Judge
with MT-Bench and Chatbot Arena"): one question, two anonymous answers, a short comparison first and
then a verdict in a fixed, machine-readable form. The wording is ours, not MT-Bench's. The system
message (``SYSTEM_PROMPT``) asks for an impartial comparison on how well each answer does what the
user asked (helpful, correct, relevant, as detailed as the question needs), and tells the judge that
the order of the answers, their length and the assistants' names must not count; the user message
(``USER_TEMPLATE``) frames the question and the two answers::

    ## Question
    {question}

    ## Answer A
    {answer_a}
    ## End of answer A

    ## Answer B
    {answer_b}
    ## End of answer B

The reply must end with the verdict written exactly as ``[[A]]`` (A is better), ``[[B]]`` (B is
better) or ``[[C]]`` (a tie), so a judge's free text before it never has to be understood.

- ``EndpointJudge`` (an OpenAI-compatible server: vLLM, ``transformers serve``, OpenAI) sends the
  two messages as a chat request at temperature 0. A served model without a chat template cannot
  chat (``transformers serve`` answers 400 "tokenizer.chat_template is not set"); the judge then
  sends the same messages as one plain transcript to ``/completions`` (``System: ...\\n\\nUser:
  ...\\n\\nAssistant:``, as orpo renders prompts without a template). The verdict is the LAST
  ``[[A]]``, ``[[B]]`` or ``[[C]]`` in the reply (the explanation comes first and may quote the
  format); a reply with none is a tie, its text kept in ``raw`` and ``parsed`` False.
- ``LocalJudge`` (a model folder or hub name) renders the same messages with the judge's chat
  template (plain transcript without one), starts the reply with "My final verdict is: " and
  scores the three continuations ``[[A]]``, ``[[B]]``, ``[[C]]`` by the model's log-likelihood;
  the most likely is the verdict. Deterministic, needs no generation, and always parses; ``raw``
  holds the three log-probabilities. It is a weaker judge than a generating one (no explanation
  before the verdict), but works with any causal LM.

Each question is judged twice, the answers in both orders (``judge_both_orders``), to cancel the
judge's position bias: the first answer wins only if it wins in both orders, or wins one and ties
the other; a disagreement is a tie.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Protocol

from orpo.config import ConfigError
from orpo.data.formats import Message, Pair

SYSTEM_PROMPT = (
    "You are a fair referee comparing two AI assistants. Below are a user's question and one answer from each "
    "assistant, labelled A and B. Decide which answer serves the user better: it does what was asked, it is "
    "correct and relevant, and it gives as much detail as the question needs, no more. Judge the content only: "
    "the order in which the answers are shown, how long they are and what the assistants are called must not "
    "change your decision. First compare the two answers in a few sentences. Then give your verdict on a line of "
    'its own, written exactly as "[[A]]" if answer A is better, "[[B]]" if answer B is better, or "[[C]]" if '
    "neither is better."
)
USER_TEMPLATE = (
    "## Question\n{question}\n\n"
    "## Answer A\n{answer_a}\n## End of answer A\n\n"
    "## Answer B\n{answer_b}\n## End of answer B"
)
# the local judge's reply starts so; the three verdict continuations follow it
VERDICT_LEAD = "My final verdict is: "
VERDICTS = {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"}
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
JUDGE_MAX_TOKENS = 512
API_KEY_ENV = "ORPO_JUDGE_API_KEY"


@dataclass(frozen=True)
class OneVerdict:
    """One judgment of (A, B): ``winner`` "A", "B" or "tie"; ``raw`` the judge's reply (or scores)."""

    winner: str
    raw: str
    parsed: bool = True


@dataclass(frozen=True)
class Verdict:
    """One question judged in both orders: ``forward`` shows the first answer as A, ``backward`` as B."""

    forward: OneVerdict
    backward: OneVerdict
    outcome: str


class Judge(Protocol):
    name: str

    def verdicts(self, prompts: list[str], answers_a: list[str], answers_b: list[str]) -> list[OneVerdict]: ...


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[Message]:
    """The documented judge prompt for one comparison: a system and a user message."""
    return [Message(role="system", content=SYSTEM_PROMPT),
            Message(role="user", content=USER_TEMPLATE.format(question=question, answer_a=answer_a,
                                                              answer_b=answer_b))]


def plain_transcript(messages: list[Message]) -> str:
    """The messages as orpo renders a prompt without a chat template (``System: ...\\n\\nAssistant:``)."""
    from orpo.data.templates import ChatTemplate, render_prompt

    return render_prompt(Pair(prompt=messages, chosen="x", rejected="y"), ChatTemplate(name="none", jinja=None), None)


def parse_verdict(reply: str) -> OneVerdict:
    """The last ``[[A]]`` / ``[[B]]`` / ``[[C]]`` in ``reply``; none of them: a tie, ``parsed`` False."""
    found = _VERDICT.findall(reply)
    if not found:
        return OneVerdict(winner="tie", raw=reply, parsed=False)
    return OneVerdict(winner={"A": "A", "B": "B", "C": "tie"}[found[-1]], raw=reply)


def combine(forward: OneVerdict, backward: OneVerdict) -> str:
    """"first", "second" or "tie" from the two orders (the first answer is A in ``forward``, B in ``backward``)."""
    first = {"A": 1, "B": -1, "tie": 0}[forward.winner] + {"B": 1, "A": -1, "tie": 0}[backward.winner]
    return "first" if first > 0 else "second" if first < 0 else "tie"


def judge_both_orders(judge: Judge, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[Verdict]:
    """Every question asked twice, the answers swapped the second time (one ``verdicts`` call for all)."""
    if not len(prompts) == len(firsts) == len(seconds):
        raise ValueError(f"{len(prompts)} prompts, {len(firsts)} first and {len(seconds)} second answers")
    n = len(prompts)
    got = judge.verdicts(prompts + prompts, firsts + seconds, seconds + firsts)
    return [Verdict(forward=got[i], backward=got[n + i], outcome=combine(got[i], got[n + i])) for i in range(n)]


def build_judge(judge: str | None, judge_url: str | None, *, dtype: str | None = None,
                trust_remote_code: bool = False, revision: str | None = None, model: str | None = None,
                max_tokens: int = JUDGE_MAX_TOKENS, batch_size: int = 4, api_key: str | None = None) -> Judge:
    """A local judge (``judge``: folder or hub name) or a served one (``judge_url``; ``model``: the
    served name, default the first the server lists; the key from ``api_key`` or ORPO_JUDGE_API_KEY)."""
    if (judge is None) == (judge_url is None):
        raise ConfigError("name one judge: --judge MODEL (a local model) or --judge-url URL (an OpenAI-compatible "
                          "endpoint), not both")
    if judge_url is not None:
        return EndpointJudge(judge_url, model=model, max_tokens=max_tokens,
                             api_key=api_key or os.environ.get(API_KEY_ENV) or None)
    if model is not None:
        raise ConfigError("--judge-model names a served model: it is for --judge-url")
    assert judge is not None
    return LocalJudge(judge, dtype=dtype or "auto", trust_remote_code=trust_remote_code, revision=revision,
                      batch_size=batch_size)


class EndpointJudge:
    """The judge prompt as a temperature-0 chat request; ``/completions`` when the model cannot chat."""

    def __init__(self, url: str, *, model: str | None = None, max_tokens: int = JUDGE_MAX_TOKENS,
                 api_key: str | None = None, concurrency: int = 4) -> None:
        from orpo.endpoint import Endpoint

        if max_tokens < 1:
            raise ConfigError(f"the judge's max tokens must be at least 1, got {max_tokens}")
        self.endpoint = Endpoint(url, model=model, api_key=api_key)
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        # None until the first request tells: "chat" or "completions"
        self.api: str | None = None
        self.name = f"endpoint:{self.endpoint.base} ({self.endpoint.served_model()})"

    def verdicts(self, prompts: list[str], answers_a: list[str], answers_b: list[str]) -> list[OneVerdict]:
        conversations = [judge_messages(q, a, b) for q, a, b in zip(prompts, answers_a, answers_b, strict=True)]
        if not conversations:
            return []
        replies = []
        if self.api is None:
            replies.append(self._first(conversations[0]))
        rest = conversations[len(replies):]
        if self.api == "chat":
            replies += self.endpoint.chat_many([_dicts(c) for c in rest], concurrency=self.concurrency,
                                               max_tokens=self.max_tokens, temperature=0.0)
        else:
            replies += self.endpoint.complete_many([plain_transcript(c) for c in rest], concurrency=self.concurrency,
                                                   max_tokens=self.max_tokens, temperature=0.0)
        return [parse_verdict(r) for r in replies]

    def _first(self, messages: list[Message]) -> str:
        """The first request decides chat or completions: a model without a chat template cannot chat."""
        from orpo.endpoint import EndpointError

        try:
            reply = self.endpoint.chat(_dicts(messages), max_tokens=self.max_tokens, temperature=0.0)
        except EndpointError as e:
            if e.status != 400 or not re.search(r"chat[ _]template", e.detail, re.IGNORECASE):
                raise
            self.api = "completions"
            return self.endpoint.complete(plain_transcript(messages), max_tokens=self.max_tokens, temperature=0.0)
        self.api = "chat"
        return reply


def _dicts(messages: list[Message]) -> list[dict]:
    return [dict(m) for m in messages]


class LocalJudge:
    """The verdict whose text ``[[A]]`` / ``[[B]]`` / ``[[C]]`` the model finds most likely after the prompt."""

    def __init__(self, source: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None, batch_size: int = 4) -> None:
        from orpo.data.templates import resolve_chat_template
        from orpo.train.evaluate import load_for_inference

        if batch_size < 1:
            raise ConfigError(f"the judge's batch size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = load_for_inference(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        key="--judge", revision=revision, flags=True)
        self.template = resolve_chat_template(None, self.tokenizer)
        self.batch_size = batch_size
        self.name = f"local:{source}"

    def sequences(self, question: str, answer_a: str, answer_b: str) -> tuple[list[list[int]], int]:
        """The three token sequences (prompt, the reply's lead, a verdict) and where they start to differ."""
        from orpo.data.templates import render_prompt
        from orpo.data.tokenize import encode_prompt

        messages = judge_messages(question, answer_a, answer_b)
        text = render_prompt(Pair(prompt=messages, chosen="x", rejected="y"), self.template, self.tokenizer)
        lead = " " + VERDICT_LEAD if self.template.is_plain else VERDICT_LEAD
        rows = [encode_prompt(text + lead + verdict, self.tokenizer) for verdict in VERDICTS.values()]
        start = 0
        while all(start < len(r) for r in rows) and len({r[start] for r in rows}) == 1:
            start += 1
        return rows, start

    def verdicts(self, prompts: list[str], answers_a: list[str], answers_b: list[str]) -> list[OneVerdict]:
        asked = [self.sequences(q, a, b) for q, a, b in zip(prompts, answers_a, answers_b, strict=True)]
        out = []
        for first in range(0, len(asked), self.batch_size):
            for row in self.scores(asked[first:first + self.batch_size]):
                best = max(range(len(row)), key=lambda k: row[k])
                raw = ", ".join(f"{text} {logp:.4f}" for text, logp in zip(VERDICTS.values(), row, strict=True))
                out.append(OneVerdict(winner=list(VERDICTS)[best], raw=f"log-likelihood {raw}"))
        return out

    def scores(self, asked: list[tuple[list[list[int]], int]]) -> list[list[float]]:
        """Per question, the summed log-probability of each verdict's own tokens (one right-padded forward)."""
        import torch

        from orpo.loss import token_logps_from_logits

        limit = getattr(self.model.config, "max_position_embeddings", None)
        rows, labels = [], []
        for sequences, start in asked:
            for ids in sequences:
                if limit is not None and len(ids) > limit:
                    raise ConfigError(f"--judge: the judge prompt is {len(ids)} tokens, more than the judge's "
                                      f"context of {limit}: ask for shorter answers (--max-new-tokens)")
                rows.append(ids)
                labels.append([-100] * start + ids[start:])
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.model.device
        input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device)
        target = torch.tensor([lab + [-100] * (longest - len(lab)) for lab in labels], device=device)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        # position t predicts token t + 1
        logps = token_logps_from_logits(logits[:, :-1], target[:, 1:]).sum(-1).tolist()
        k = len(VERDICTS)
        return [logps[i:i + k] for i in range(0, len(logps), k)]
