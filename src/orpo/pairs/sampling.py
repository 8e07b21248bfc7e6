"""Samples for pairs, each seeded by itself: the same sample whatever batch it is generated in.

``orpo.generation.generate`` seeds a whole call once, so a sampled row depends on its batch mates
and on the order of the batches; a resumed run would then generate other samples than an
uninterrupted one. Here every sample has its own ``torch.Generator`` seeded from (``--seed``,
source row, sample index), drawing its tokens alone, in a KV-cache loop over a left-padded batch
(positions from the mask, as ``generate`` does). ``--generator-url`` sends the same per-sample seed
to an OpenAI-compatible server (vLLM honours it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from orpo.data.formats import Message, Pair
from orpo.generation import _cache_name, cut_at_eos, left_pad


def sample_seed(seed: int, row: int, k: int) -> int:
    """A 63-bit seed of one sample: unrelated streams for neighbouring rows and samples."""
    digest = hashlib.sha256(f"orpo-pairs:{seed}:{row}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class SampleSpec:
    temperature: float
    top_p: float
    max_new_tokens: int


@torch.no_grad()
def sample_tokens(model, prompts: list[list[int]], seeds: list[int], spec: SampleSpec, *, pad_token_id: int | None,
                  eos_token_id: int | None, batch_size: int = 16) -> list[list[int]]:
    """New token ids per prompt (EOS kept), each prompt sampled with its own seed."""
    device = next(model.parameters()).device
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], pad, device)
        gens = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        new = _loop(model, ids, mask, gens, spec, pad, eos_token_id)
        for i, toks in zip(rows, new, strict=True):
            out[i] = cut_at_eos(toks, eos_token_id)
    return out


def _loop(model, ids: torch.Tensor, mask: torch.Tensor, gens: list[torch.Generator], spec: SampleSpec, pad: int,
          eos: int | None) -> list[list[int]]:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = _cache_name(model)
    done = [False] * len(gens)
    new: list[list[int]] = [[] for _ in gens]
    for step in range(spec.max_new_tokens):
        tokens = [_draw(row, g, spec) if not d else pad
                  for row, g, d in zip(result.logits[:, -1].float().cpu(), gens, done, strict=True)]
        for r, t in enumerate(tokens):
            if not done[r]:
                new[r].append(t)
                done[r] = t == eos
        if all(done) or step + 1 == spec.max_new_tokens:
            break
        token = torch.tensor(tokens, dtype=torch.long, device=ids.device).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
        result = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache: getattr(result, cache)})
    return new


def _draw(logits: torch.Tensor, gen: torch.Generator, spec: SampleSpec) -> int:
    if spec.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / spec.temperature, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, idx = probs.sort(descending=True)
        # keep the smallest head whose mass reaches top_p (at least one token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= spec.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


class LocalGenerator:
    """A causal LM loaded here (``load_for_inference``), prompts rendered as training renders them."""

    def __init__(self, name: str, *, chat_template: str | None, batch_size: int, dtype: str = "auto",
                 trust_remote_code: bool = False, revision: str | None = None) -> None:
        from orpo.data.templates import resolve_chat_template
        from orpo.train.evaluate import load_for_inference

        self.name = name
        self.model, self.tokenizer = load_for_inference(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        revision=revision, flags=True)
        self.template = resolve_chat_template(chat_template, self.tokenizer)
        self.batch_size = batch_size
        self.truncated = 0

    def _fit(self, ids: list[int], spec: SampleSpec) -> list[int]:
        """A prompt cut from the left (as training cuts it, BOS kept) so that it and the sample fit the
        model's positions; counted in ``truncated``."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        keep = (limit or 0) - spec.max_new_tokens
        if not limit or len(ids) <= max(keep, 1):
            return ids
        self.truncated += 1
        bos = self.tokenizer.bos_token_id
        head = ids[:1] if bos is not None and ids[0] == bos else []
        return head + ids[len(ids) - max(keep, 1) + len(head):]

    def prompt_text(self, prompt: str | list[Message]) -> str:
        from orpo.data.templates import render_prompt

        return render_prompt(Pair(prompt=prompt, chosen="x", rejected="y"), self.template, self.tokenizer)

    def sample(self, prompts: list[str | list[Message]], seeds: list[int], spec: SampleSpec) -> list[str]:
        from orpo.data.tokenize import encode_prompt

        ids = [self._fit(encode_prompt(self.prompt_text(p), self.tokenizer), spec) for p in prompts]
        new = sample_tokens(self.model, ids, seeds, spec, pad_token_id=self.tokenizer.pad_token_id,
                            eos_token_id=self.tokenizer.eos_token_id, batch_size=self.batch_size)
        replies = [self.tokenizer.decode(n, skip_special_tokens=True).strip() for n in new]
        if not self.template.is_plain:
            return replies
        return [plain_reply(p, r) for p, r in zip(prompts, replies, strict=True)]


def plain_reply(prompt: str | list[Message], reply: str) -> str:
    """A plain-text reply to a text prompt follows it after a space (HH's "Assistant: ..."), as training
    renders it (prompt + response); a message-list prompt's reply gets its space from the renderer."""
    return " " + reply if reply and isinstance(prompt, str) and not prompt[-1:].isspace() else reply


class EndpointGenerator:
    """A model behind an OpenAI-compatible server: chat requests, or plain completions with ``--chat-template none``."""

    def __init__(self, url: str, model: str | None, *, chat: bool, api_key: str | None = None,
                 concurrency: int = 4) -> None:
        from orpo.endpoint import Endpoint

        self.endpoint = Endpoint(url, model=model, api_key=api_key)
        self.name = f"{url} ({model or self.endpoint.served_model()})"
        self.chat, self.concurrency = chat, concurrency

    def sample(self, prompts: list[str | list[Message]], seeds: list[int], spec: SampleSpec) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        from orpo.data.templates import _plain_prompt, chat_messages

        kw: dict[str, Any] = {"max_tokens": spec.max_new_tokens, "temperature": spec.temperature, "top_p": spec.top_p}

        # one request per sample: each carries its own seed, so no sample depends on its batch mates
        def ask(job: tuple[str | list[Message], int]) -> str:
            prompt, seed = job
            if self.chat:
                messages = chat_messages(Pair(prompt=prompt, chosen="x", rejected="y"))[0]
                return self.endpoint.chat([dict(m) for m in messages], seed=seed % 2**31, **kw).strip()
            return plain_reply(prompt, self.endpoint.complete(_plain_prompt(prompt), seed=seed % 2**31, **kw).strip())

        jobs = list(zip(prompts, seeds, strict=True))
        if self.concurrency <= 1 or len(jobs) <= 1:
            texts = [ask(j) for j in jobs]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
                texts = list(pool.map(ask, jobs))
        if spec.temperature > 0:
            self._check_sampling(prompts, texts, spec)
        return texts

    def _check_sampling(self, prompts: list[str | list[Message]], texts: list[str], spec: SampleSpec) -> None:
        """A server that decodes greedily whatever the temperature returns one text for every seed of a
        prompt: best-vs-worst would then drop every row as "identical texts". Said, not silently done."""
        from orpo.endpoint import EndpointError

        groups: dict[str, list[str]] = {}
        for p, t in zip(prompts, texts, strict=True):
            groups.setdefault(repr(p), []).append(t)
        repeated = [g for g in groups.values() if len(g) > 1 and any(t.strip() for t in g)]
        if repeated and all(len(set(g)) == 1 for g in repeated):
            raise EndpointError(
                f"--generator-url {self.endpoint.base}: every seed of a prompt gave the same text at --temperature "
                f"{spec.temperature} ({len(repeated)} prompts): the server is not sampling. `transformers serve` "
                "samples only when the model's generation_config.json has \"do_sample\": true; vLLM samples "
                "whenever the temperature is above 0")
