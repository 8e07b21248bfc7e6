"""lm-eval's HF backend on a model orpo already holds, prompting it the way orpo trains it.

``HFLM`` given a model instance runs as one process (rank 0 of 1): every caller runs every request
itself, which is what a sharded training run needs (its ranks must run the same forwards). What it
changes here: the chat template comes from orpo (``model.chat_template``: the tokenizer's own,
chatml, llama3, zephyr or a .jinja file, rendered by ``orpo.data.templates``, so a benchmark prompt
is the prompt training saw), and it asks the hub nothing about the model.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from orpo.data.formats import Message, Pair
from orpo.data.templates import ChatTemplate, render_prompt


class OrpoLM(HFLM):
    """``HFLM(pretrained=model)`` whose chat template is orpo's ``template``."""

    def __init__(self, model, tokenizer, template: ChatTemplate, *, batch_size: int, max_length: int | None,
                 mixed_precision_dtype: torch.dtype | None = None):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         mixed_precision_dtype=mixed_precision_dtype)
        self.template = template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as orpo renders a training prompt (``render_prompt``); with
        ``add_generation_prompt`` False (a task's ``gen_prefix``) the last assistant turn is left open."""
        messages = [Message(role=m["role"], content=m["content"]) for m in chat_history]
        if add_generation_prompt:
            return render_prompt(Pair(prompt=messages, chosen="", rejected=""), self.template, self.tokenizer)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template.jinja, tokenize=False,
                                                  add_generation_prompt=False, continue_final_message=True)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.jinja

    def get_model_info(self) -> dict[str, Any]:
        """Size and dtype; HFLM's own asks the hub for a commit hash of ``pretrained``."""
        return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(getattr(self._model, "dtype", "")), "model_revision": "", "model_sha": ""}
