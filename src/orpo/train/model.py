"""Load the tokenizer and the causal LM a run trains: hub/local weights or a fresh model, LoRA, QLoRA.

Every choice here comes from ``ModelConfig``; nothing reads the data or the optimizer, so the CLI's
``orpo eval`` / ``orpo generate`` load models through the same two functions as training.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orpo.config import ConfigError, LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PadTokenChoice:
    """What ``ensure_pad_token`` did, so the run can say it once instead of silently."""

    token: str
    token_id: int
    added_from: str | None  # "unk" / "eos" when we picked one, None when the tokenizer had its own

    def describe(self) -> str:
        if self.added_from is None:
            return f"pad token: {self.token!r} (id {self.token_id}, the tokenizer's own)"
        return (f"pad token: the tokenizer has none, using its {self.added_from} token {self.token!r} "
                f"(id {self.token_id}); pad positions are masked out of attention and loss")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer at ``model.tokenizer`` (default ``model.name_or_path``), with a pad token."""
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:
        raise ConfigError("no model: set model.name_or_path (or model.init with model.tokenizer), or pass a "
                          "model and its tokenizer to train() in Python")
    tok = AutoTokenizer.from_pretrained(
        source, revision=cfg.revision if cfg.tokenizer is None else None, trust_remote_code=cfg.trust_remote_code
    )
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tokenizer) -> PadTokenChoice:
    """Give a tokenizer without a pad token one: its unk token, else its eos token.

    Why those and not a new token: adding a token would grow the vocabulary and the embedding
    matrix of a pretrained model. Which id pads does not matter for ORPO: the attention mask hides
    pad positions and they carry no target (``labels == -100``), so unk (never a target in real
    text) is the safest; eos is the fallback (stories260K has unk, so it gets unk).
    """
    if tokenizer.pad_token is not None:
        return PadTokenChoice(tokenizer.pad_token, tokenizer.pad_token_id, None)
    for name in ("unk", "eos"):
        token = getattr(tokenizer, f"{name}_token")
        if token is not None:
            tokenizer.pad_token = token
            return PadTokenChoice(token, tokenizer.pad_token_id, name)
    raise ConfigError(
        "the tokenizer has no pad, unk or eos token: set one (e.g. tokenizer.pad_token) before training"
    )


def load_model(cfg: ModelConfig, tokenizer, seed: int = 42, device_map: Any = None) -> PreTrainedModel:
    """The model to train: pretrained or fresh, optionally QLoRA-quantized, LoRA-wrapped, checkpointed."""
    if cfg.load_in_4bit:
        check_qlora_available()
    if cfg.init is not None:
        model = build_model(cfg, tokenizer, seed)
    else:
        kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
                                  "dtype": "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if cfg.load_in_4bit:
            kwargs["quantization_config"] = _bnb_config()
            kwargs["device_map"] = device_map if device_map is not None else {"": torch.cuda.current_device()}
        if cfg.name_or_path is None:
            raise ConfigError("no model: set model.name_or_path or model.init, or pass a model to train() in Python")
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    return adapt_model(model, cfg, tokenizer)


# keys that say how to load a model from disk, meaningless for a model object given in Python
_LOAD_KEYS = ("name_or_path", "init", "revision", "attn_implementation", "load_in_4bit", "trust_remote_code")


def adapt_given_model(model, cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """A model object passed in Python (a notebook): ``model.dtype`` casts it, then as ``adapt_model``.

    The keys that only say how to load a model must be unset, or they would silently do nothing.
    The object itself is trained (LoRA wraps it in place, as PEFT does).
    """
    set_keys = [f"model.{k}" for k in _LOAD_KEYS if getattr(cfg, k) not in (None, False)]
    if set_keys:
        raise ConfigError(f"a model object was passed, so {', '.join(set_keys)} would do nothing: unset "
                          f"{'it' if len(set_keys) == 1 else 'them'} (load the model as you need it instead)")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise ConfigError(f"model: expected a transformers causal LM (or a PEFT model), got {type(model).__name__}")
    if cfg.lora is not None and is_peft_model(model):
        raise ConfigError("model.lora is set but the model passed already has PEFT adapters: unset model.lora "
                          "to train its adapters, or pass the base model")
    if cfg.dtype != "auto":
        model = model.to(DTYPES[cfg.dtype])
    return adapt_model(model, cfg, tokenizer)


def adapt_model(model, cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """Fit a loaded model to its run: pad id, tokenizer check, gradient checkpointing, (Q)LoRA."""
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    embedding: Any = model.get_input_embeddings()
    rows = int(embedding.num_embeddings)
    if len(tokenizer) > rows:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows}: "
                          "model.tokenizer does not belong to this model")
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        # transformers 5.x renamed gradient_checkpointing_enable; keep both spellings working.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, revision=cfg.revision)
    return model


def build_model(cfg: ModelConfig, tokenizer, seed: int) -> PreTrainedModel:
    """A fresh model from ``model.init``; vocabulary and special ids come from the tokenizer.

    Seeded here (not only by the caller) so the same config gives the same initial weights even
    if something drew random numbers before.
    """
    assert cfg.init is not None
    params = cfg.init.model_dump(exclude={"arch"})
    params.setdefault("vocab_size", len(tokenizer))
    if params["vocab_size"] < len(tokenizer):
        raise ConfigError(f"model.init.vocab_size={params['vocab_size']} is below the tokenizer's "
                          f"{len(tokenizer)} tokens")
    for name in ("bos", "eos", "pad"):
        params.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    try:
        config = AutoConfig.for_model(cfg.init.arch, **params)
    except ValueError as e:
        raise ConfigError(f"model.init.arch: {e}") from None
    kwargs: dict[str, Any] = {"dtype": torch.float32 if cfg.dtype == "auto" else DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, **kwargs)


def apply_lora(model: PreTrainedModel, lora: LoraConfig, revision: str | None = None):
    """Wrap ``model`` in a PEFT LoRA adapter; only the adapter (and ``modules_to_save``) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT says int; the scale alpha/r takes floats lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save, task_type="CAUSAL_LM", revision=revision,
    )
    return get_peft_model(model, peft_cfg)


def check_qlora_available() -> None:
    """QLoRA's 4-bit kernels are CUDA-only bitsandbytes code: say so before loading anything."""
    if not torch.cuda.is_available():
        raise ConfigError("model.load_in_4bit (QLoRA) needs a CUDA GPU; none is visible. "
                          "Use LoRA without load_in_4bit on this machine.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.load_in_4bit (QLoRA) needs bitsandbytes: pip install 'orpo[qlora]'")


def _bnb_config():
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def logits_keep_mode(model) -> str | None:
    """How this model's forward can skip the LM head on positions without a target.

    ``"mask"``: transformers' ``slice_logits_to_keep`` (a ``[B, T]`` bool mask keeps exactly the
    positions the loss reads, per row); ``"positions"``: an older ``logits_to_keep`` that indexes
    ``hidden_states[:, idx]`` with a 1-D tensor; ``None``: no support, compute every logit.
    The LM head is applied per position, so dropping positions is exact.
    """
    inner = base_model(model)
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    module = sys.modules.get(type(inner).__module__)
    return "mask" if getattr(module, "slice_logits_to_keep", None) is not None else "positions"
