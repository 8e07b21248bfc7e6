"""Load the tokenizer and the causal LM a run trains: hub/local weights or a fresh model, LoRA, QLoRA.

Every choice here comes from ``ModelConfig``; nothing reads the data or the optimizer, so the CLI's
``orpo eval`` / ``orpo generate`` load models through the same two functions as training.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orpo.config import ConfigError, LoraConfig, ModelConfig, QuantizationConfig
from orpo.loading import Source, check_source, load

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
    if cfg.tokenizer is None:
        # the model's folder: said as a model folder (empty, an adapter, an encoder) before its tokenizer
        check_source(Source(source, "model.name_or_path"), trust_remote_code=cfg.trust_remote_code)
        where = Source(source, "model.name_or_path", "tokenizer", revision=cfg.revision)
    else:
        where = Source(source, "model.tokenizer", "tokenizer")
    tok = load(AutoTokenizer.from_pretrained, where, trust_remote_code=cfg.trust_remote_code)
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
    if cfg.quantized() is not None:
        check_qlora_available("model.quantization" if cfg.quantization is not None else "model.load_in_4bit")
    if cfg.lora is not None and cfg.init is not None and cfg.lora.init_lora_weights in ("pissa", "olora"):
        raise ConfigError(f"model.lora.init_lora_weights={cfg.lora.init_lora_weights} subtracts the adapter's start "
                          "from the base weights, and a model.init base is saved as trained (final/base): the "
                          "adapter would not reload onto it. Use it with a pretrained model.name_or_path.")
    if cfg.init is not None:
        model = build_model(cfg, tokenizer, seed)
    else:
        if cfg.name_or_path is None:
            raise ConfigError("no model: set model.name_or_path or model.init, or pass a model to train() in Python")
        if cfg.quantized() is not None and device_map is None:
            device_map = {"": torch.cuda.current_device()}
        source = Source(cfg.name_or_path, "model.name_or_path", revision=cfg.revision)
        model = load(AutoModelForCausalLM.from_pretrained, source, **pretrained_kwargs(cfg, device_map))
    return adapt_model(model, cfg, tokenizer)


def pretrained_kwargs(cfg: ModelConfig, device_map: Any = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments of the trained model: orpo's keys, then ``model.init_kwargs``
    (the config refuses those that would overwrite one of orpo's). ``revision`` goes with the source."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code,
                              "dtype": "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = cfg.quantized()
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization)
    if device_map is not None:
        kwargs["device_map"] = device_map
    return {**kwargs, **cfg.init_kwargs}


# keys that say how to load a model from disk, meaningless for a model object given in Python
_LOAD_KEYS = ("name_or_path", "init", "revision", "attn_implementation", "load_in_4bit", "trust_remote_code",
              "quantization", "init_kwargs")


def adapt_given_model(model, cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """A model object passed in Python (a notebook): ``model.dtype`` casts it, then as ``adapt_model``.

    The keys that only say how to load a model must be unset, or they would silently do nothing.
    The object itself is trained (LoRA wraps it in place, as PEFT does).
    """
    set_keys = [f"model.{k}" for k in _LOAD_KEYS if getattr(cfg, k) not in (None, False, {})]
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
    if cfg.quantized() is not None:
        from peft import prepare_model_for_kbit_training

        # Norms and embeddings to float32, base frozen. Checkpointing is ours (below): PEFT's goes
        # through the deprecated gradient_checkpointing_enable (a FutureWarning), use_reentrant unset.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, revision=cfg.revision)
    if cfg.gradient_checkpointing:
        enable_checkpointing(base_model(model), cfg.gradient_checkpointing_kwargs)
    return model


# Dropout rates that models read from their config or keep as plain floats and apply functionally
# (Llama's attention: ``dropout=self.attention_dropout`` in the attention call), so no nn.Dropout shows them.
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                  "dropout", "dropout_p")


def disable_dropout(model) -> None:
    """Every dropout of ``model`` to 0 (``train.disable_dropout``): ``nn.Dropout`` modules (LoRA's too),
    float rates kept on modules, and the same rates in the model config (read again by a rebuilt layer)."""
    configs = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in _DROPOUT_ATTRS:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
    for config in list(configs.values()):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        configs[id(text)] = text
    for sub in configs.values():
        for name, value in sub.to_dict().items():
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float) and hasattr(sub, name):
                setattr(sub, name, 0.0)


def enable_checkpointing(model, kwargs: dict[str, Any] | None = None) -> None:
    """Non-reentrant activation checkpointing (unless ``kwargs``, ``model.gradient_checkpointing_kwargs``,
    say otherwise), enabled after any LoRA wrapping.

    Non-reentrant: the adapter gets its gradients although the checkpointed layers' inputs are
    frozen; the reentrant mode needs PEFT's ``enable_input_require_grads`` workaround for that.
    After wrapping: PEFT then sees an unchecked model and leaves it alone, so the one input-grad
    hook is the one transformers registers here (harmless: it only adds the embedding output's
    gradient to the backward).
    """
    from torch.utils.checkpoint import checkpoint

    options = {"use_reentrant": False} if kwargs is None else dict(kwargs)
    # transformers keeps them in a partial of torch's checkpoint: a wrong name would fail at the first
    # backward. preserve_rng_state is documented but read from **kwargs.
    known = [n for n, p in inspect.signature(checkpoint).parameters.items() if p.kind is p.KEYWORD_ONLY]
    known.append("preserve_rng_state")
    for key in options:
        if key not in known:
            raise ConfigError(f"model.gradient_checkpointing_kwargs.{key}: not an argument of "
                              f"torch.utils.checkpoint.checkpoint ({', '.join(known)})")
    # transformers 5.x renamed gradient_checkpointing_enable; keep both spellings working.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.config.use_cache = False


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
        _check_fits(config, kwargs["dtype"])
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(config, **kwargs)
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
                raise
            raise ConfigError(f"model.init: the model does not fit in memory ({' '.join(str(e).split())[:160]}): "
                              "make model.init smaller") from e


def _check_fits(config, dtype: torch.dtype) -> None:
    """A ``model.init`` whose weights cannot be allocated is a ConfigError naming its size, not an
    allocator traceback after minutes. Counted on the meta device (no memory) with one and with two
    layers, then extrapolated to ``num_hidden_layers`` (every layer alike), so a config of a million
    layers costs two tiny builds."""
    import copy

    import psutil

    text = config.get_text_config()
    layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return
    counts = []
    for n in (1, 2):
        probe = copy.deepcopy(config)
        sub = probe.get_text_config()
        sub.num_hidden_layers = n
        if isinstance(getattr(sub, "layer_types", None), list):
            sub.layer_types = sub.layer_types[:n] * (1 if len(sub.layer_types) >= n else n)
        try:
            with torch.device("meta"):
                counts.append(sum(p.numel() for p in AutoModelForCausalLM.from_config(probe).parameters()))
        except Exception:  # an architecture that will not build with fewer layers: from_config says why later
            return
    params = counts[0] + (layers - 1) * (counts[1] - counts[0])
    need, free = params * torch.finfo(dtype).bits // 8, psutil.virtual_memory().available
    if need > free:
        raise ConfigError(f"model.init: {params:,} parameters, {need / 2**30:,.1f} GiB of {str(dtype).removeprefix('torch.')} "
                          f"weights alone, and {free / 2**30:,.1f} GiB of memory are available: make it smaller "
                          "(hidden_size, intermediate_size, num_hidden_layers, vocab_size)")


# ---------------------------------------------------------------------------------------------
# LoRA


class LoraMismatchError(ConfigError):
    """The adapter PEFT built is not the one ``model.lora`` describes."""


def apply_lora(model: PreTrainedModel, lora: LoraConfig, revision: str | None = None):
    """Wrap ``model`` in a PEFT LoRA adapter and check that it is the configured one (``check_lora``)."""
    from peft import get_peft_model

    expected = lora_target_names(model, lora)
    target: str | list[str] = lora.target_modules
    if target == "all-linear" and lora.layers_to_transform is not None:
        # PEFT takes a layer subset only with a list of names: spell 'all-linear' out as one.
        target = sorted({name.rsplit(".", 1)[-1] for name in expected})
    try:
        with peft_deprecations_silenced():
            wrapped = get_peft_model(model, peft_lora_config(lora, target, revision))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.lora: PEFT rejects it: {_one_line(e)}") from None
    check_lora(wrapped, lora, expected)
    return wrapped


def peft_lora_config(lora: LoraConfig, target_modules: str | list[str] | None = None, revision: str | None = None):
    """PEFT's ``LoraConfig`` for ``model.lora``: each of our keys is one PEFT argument."""
    from peft import LoraConfig as PeftLoraConfig

    options: dict[str, Any] = dict(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if target_modules is None else target_modules,
        layers_to_transform=lora.layers_to_transform,
        modules_to_save=lora.modules_to_save,
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM",
        revision=revision,
    )
    try:
        return PeftLoraConfig(**options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.lora: PEFT rejects it: {_one_line(e)}") from None


@contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """PEFT 0.21 asks transformers 5 for the deprecated ``is_gradient_checkpointing`` whenever it wraps
    a model, a FutureWarning about PEFT's code, not the user's. Nothing else is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + " ..."


def lora_target_names(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """The modules ``lora`` asks to adapt in (unwrapped) ``model``, worked out without PEFT.

    'all-linear': every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) but the output embedding;
    a list: modules named an entry or ending in '.' + an entry; another string: a regex that
    must match the full name. Then ``layers_to_transform`` keeps the listed layer indices, and
    modules in ``modules_to_save`` (trained in full) are never adapted, as in PEFT.
    """
    from transformers.pytorch_utils import Conv1D

    target = lora.target_modules
    output_embeddings = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    names = []
    for name, module in model.named_modules():
        if not name or any(f".{m}." in f".{name}." for m in lora.modules_to_save or []):
            continue
        if target == "all-linear":
            hit = isinstance(module, torch.nn.Linear | Conv1D) and module is not output_embeddings
        elif isinstance(target, str):
            hit = re.fullmatch(target, name) is not None
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in target)
        if hit and lora.layers_to_transform is not None:
            hit = _layer_index(name) in lora.layers_to_transform
        if not hit:
            continue
        children = [n for n, c in module.named_children() if isinstance(c, torch.nn.Linear | Conv1D)]
        if children and not isinstance(module, torch.nn.MultiheadAttention):
            raise ConfigError(f"model.lora.target_modules: {name} is a {type(module).__name__}, a block of layers, "
                              f"not a layer LoRA can adapt: name its layers instead ({', '.join(children)})")
        names.append(name)
    return names


def _layer_index(name: str) -> int | None:
    """The layer a module belongs to: the first number in its dotted name (``model.layers.3.mlp`` -> 3)."""
    parts = name.split(".")
    return next((int(p) for p in parts[1:-1] if p.isdigit()), None)


def adapted_layers(model) -> dict[str, Any]:
    """The PEFT LoRA layers of a PEFT model, by their name in the transformers model."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in base_model(model).named_modules() if isinstance(m, LoraLayer)}


def check_lora(model, lora: LoraConfig, expected: list[str]) -> None:
    """Read the adapter back from the PEFT model and compare it with ``lora``; a mismatch is an error.

    Compared: the adapted modules (with ``expected``, from ``lora_target_names``), and per module
    the dropout, rank, scale and DoRA. Why: in issue 6 two arguments sat in a comment, every run
    got PEFT's defaults (q_proj and v_proj, no dropout) whatever the YAML said, and nothing showed.
    Entries that select nothing (a misspelt module, a layer the model lacks, a modules_to_save
    name PEFT did not find) are errors too: PEFT skips them silently.
    """
    from peft.utils import ModulesToSaveWrapper

    adapter = model.active_adapter
    built = adapted_layers(model)
    problems = []
    if set(built) != set(expected):
        missing = [n for n in expected if n not in built]
        extra = [n for n in built if n not in set(expected)]
        problems.append(f"modules: configured {_summary(expected)}, built {_summary(list(built))}"
                        f"{f'; missing {missing[:3]}' if missing else ''}{f'; unexpected {extra[:3]}' if extra else ''}")
    scale = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    for name, layer in built.items():
        drop = layer.lora_dropout[adapter]
        got = {"dropout": drop.p if isinstance(drop, torch.nn.Dropout) else 0.0, "r": layer.r[adapter],
               "scale": layer.scaling[adapter], "use_dora": bool(layer.use_dora.get(adapter, False))}
        want = {"dropout": lora.dropout, "r": lora.r, "scale": scale, "use_dora": lora.use_dora}
        wrong = [k for k in want if not math.isclose(got[k], want[k], rel_tol=1e-6)]
        if wrong:
            problems.append(f"{name}: " + ", ".join(f"{k} configured {want[k]}, built {got[k]}" for k in wrong))
            break
    if not isinstance(lora.target_modules, str):
        for t in lora.target_modules:
            if not any(n == t or n.endswith(f".{t}") for n in built):
                problems.append(f"target_modules entry {t!r} matches no module of this model"
                                f"{' in layers_to_transform' if lora.layers_to_transform else ''}")
    present = {_layer_index(n) for n in built}
    for i in lora.layers_to_transform or []:
        if i not in present:
            problems.append(f"layers_to_transform: no layer {i} was adapted (adapted layers: "
                            f"{sorted(x for x in present if x is not None)})")
    if lora.bias != "none" and not any(n.endswith("bias") and p.requires_grad for n, p in model.named_parameters()):
        problems.append(f"bias={lora.bias!r} but no bias of this model trains (it has none where that applies)")
    saved = [n for n, m in base_model(model).named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for m in lora.modules_to_save or []:
        if not any(f".{m}." in f".{n}." for n in saved):
            problems.append(f"modules_to_save entry {m!r} matches no module of this model")
    if problems:
        raise LoraMismatchError("model.lora: the adapter PEFT built is not the configured one: " + "; ".join(problems))


def describe_lora(model) -> str:
    """One line for the run's summary, read from the built adapter, e.g.
    ``LoRA r=16 on 7 module kinds × 32 layers (q k v o gate up down): 41,943,040 trainable``."""
    cfg = model.peft_config[model.active_adapter]
    variants = [v for v, on in (("DoRA", cfg.use_dora), ("rsLoRA", cfg.use_rslora)) if on]
    if cfg.init_lora_weights is not True:
        variants.append(f"init {cfg.init_lora_weights}")
    line = f"LoRA r={cfg.r}"
    if variants:
        line += " (" + ", ".join(variants) + ")"
    line += " on " + _summary(list(adapted_layers(model)))
    if cfg.modules_to_save:
        line += " + " + " ".join(sorted(cfg.modules_to_save)) + " in full"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{line}: {trainable:,} trainable"


def _summary(names: list[str]) -> str:
    """``7 module kinds × 4 layers (q k v o gate up down)``, or the counts when not every layer has every kind."""
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1].removesuffix("_proj") for n in names))
    layers = {_layer_index(n) for n in names}
    shown = " ".join(kinds)
    if None not in layers and len(names) == len(kinds) * len(layers):
        return f"{len(kinds)} module kinds × {len(layers)} layers ({shown})"
    return f"{len(names)} modules of {len(kinds)} kinds in {len(layers - {None})} layers ({shown})"


def check_qlora_available(key: str = "model.load_in_4bit") -> None:
    """QLoRA's quantized kernels are CUDA bitsandbytes code here: say so before loading anything."""
    name = key.removeprefix("model.")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} (QLoRA) needs a CUDA GPU; none is visible. "
                          f"Use LoRA without {name} on this machine.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key} (QLoRA) needs bitsandbytes: pip install 'orpo[qlora]'")


def bnb_config(quant: QuantizationConfig):
    """The ``BitsAndBytesConfig`` of ``model.quantization``: one argument per key."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant.compute_dtype != "auto":
        compute = DTYPES[quant.compute_dtype]
    else:
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    storage = torch.uint8 if quant.storage_dtype == "uint8" else DTYPES[quant.storage_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=storage)


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
