"""A real judge model for tests: stories260K fine-tuned to end every judge reply with one verdict.

stories260K writes stories, never "[[A]]", so a served stories260K judge only ever exercises the
"no verdict" path. ``verdict_judge`` trains a copy (a few seconds on the CPU) to answer orpo's own
judge prompt (``orpo.judge.judge_messages``, rendered as ``EndpointJudge`` sends it: the plain
transcript for ``/completions``, or the chat template for ``/chat/completions``) with the same
verdict whatever the answers. Such a judge has the purest position bias there is, which the
both-orders design must cancel: every comparison it makes is a tie.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ("the cat dog sun tree little girl boy happy sad play ran went saw big red ball park mom friend day "
         "she he was there once upon a time and to in it with they".split())


PUNCTUATION = (".", ",", "!", "?", '"', "\n", "[", "]", ":")


def _text(rng: random.Random, n: int) -> str:
    """Story-like words with the punctuation a tiny model's answers have (quotes, brackets, newlines)."""
    words = [rng.choice(WORDS) + (rng.choice(PUNCTUATION) if rng.random() < 0.2 else "") for _ in range(n)]
    return " ".join(words).capitalize()


def verdict_judge(stories_dir: Path, folder: Path, verdict: str = "[[A]]", *, chat: bool = False,
                  steps: int = 60, seed: int = 0) -> Path:
    """Save to ``folder`` a stories260K that answers every judge prompt with ``verdict`` then EOS
    (``chat``: with ``CHAT_TEMPLATE`` set, trained on the chat rendering too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo.judge import judge_messages, plain_transcript

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    target = tokenizer(" " + verdict, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = []
    for _ in range(24):
        messages = judge_messages(_text(rng, rng.randint(3, 20)), _text(rng, rng.randint(0, 60)),
                                  _text(rng, rng.randint(0, 60)))
        prompts = [tokenizer(plain_transcript(messages))["input_ids"]]
        if chat:
            rendered = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                                     tokenize=False)
            prompts.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        rows += [(p, target) for p in prompts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = [rows[(step * 4 + i) % len(rows)] for i in range(4)]
        longest = max(len(p) + len(t) for p, t in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for r, (p, t) in enumerate(batch):
            seq = p + t
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, len(p):len(seq)] = torch.tensor(t)
            mask[r, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
