"""One validated configuration for a run: sections ``model``, ``data``, ``orpo``, ``train``.

Every field has a default and a description; ``docs/configuration.md`` is generated from the
same descriptions (``orpo config-doc``). Unknown keys, wrong types and impossible combinations
fail before any work, with the key's dotted path and a hint.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orpo.yaml_input import YAMLInputError, read_text, read_yaml, short


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (key path + hint)."""


# Bounds on what a configuration may hold. A real config is a few KiB; these stop a hostile or broken one
# (a binary file, ``[[[[...``, an alias bomb, ``hidden_size: 1e12``) with a ConfigError before any work.
MAX_INIT_JSON = 64 << 10  # model.init serialized as JSON: it goes into every config.json written
MAX_INIT_DEPTH = 8  # model.init nesting (a sub-config such as vision_config: {...} is level 2)
MAX_SIZE = 1 << 20  # any model.init size (hidden_size, num_hidden_layers, ...) and lora.alpha
LORA_MAX_RANK = 1 << 16
MAX_EPOCHS = 10_000
MAX_ERRORS = 20  # validation errors listed in one message


class _Section(BaseModel):
    # allow_inf_nan=False: no float setting has a meaning at nan or inf (``gt=0`` alone lets inf through)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)


class LoraConfig(_Section):
    """LoRA through PEFT. Present (even empty, ``lora: {}``) means enabled.

    Each key maps to one PEFT ``LoraConfig`` argument (``orpo.train.model.peft_lora_config``); the
    adapter PEFT builds is read back and compared with these keys on every run.
    """

    r: int = Field(16, gt=0, le=LORA_MAX_RANK, description="LoRA rank.")
    alpha: float = Field(
        32.0, gt=0, le=MAX_SIZE, description="LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with use_rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input (0 = none).")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every linear layer but the LM head), a list of names "
        "(a module whose name is, or ends with '.' + an entry, e.g. [q_proj, v_proj]), or any other string: a "
        "regex that must match a module's full name, e.g. '.*\\.(q|v)_proj'.",
    )
    layers_to_transform: list[int] | None = Field(
        None,
        min_length=1,
        description="Adapt only these layer indices (the first number in a module's name, e.g. model.layers.3.mlp); "
        "default: every layer. Works with 'all-linear' and a list, not with a regex.",
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. [lm_head])."
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Train biases too: none | all (every bias) | lora_only (biases of adapted layers)."
    )
    use_dora: bool = Field(
        False, description="DoRA: a trained magnitude per output feature on top of the LoRA direction update."
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = Field(
        True,
        description="true: B = 0, the adapter starts as a no-op | false: A and B random (debugging) | gaussian: "
        "A Gaussian, B = 0 | pissa / olora: start from the base weights' principal singular vectors / QR and "
        "subtract that start from the base (PEFT redoes it on reload; not with model.init).",
    )

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        regex = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
        if regex and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform works with target_modules 'all-linear' or a list, not a regex: "
                             "put the layer numbers in the regex instead")
        return self


class ModelInit(_Section):
    """A fresh model built from a config (demos, tests). Extra keys go to the transformers config."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    arch: str = Field("llama", description="transformers model_type, e.g. llama, qwen2, mistral.")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, dict):
            _check_init(value)
        return value


class QuantizationConfig(_Section):
    """bitsandbytes quantized base weights (QLoRA); each key is one ``BitsAndBytesConfig`` argument."""

    bits: Literal[4, 8] = Field(4, description="4 (QLoRA's 4-bit) or 8 (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bnb_4bit_quant_type).")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (bnb_4bit_use_double_quant).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit matmul dtype (bnb_4bit_compute_dtype); auto = bfloat16 where the GPU has it, "
        "else float16."
    )
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage)."
    )

    @model_validator(mode="after")
    def _check(self) -> QuantizationConfig:
        changed = [k for k in ("quant_type", "double_quant", "compute_dtype", "storage_dtype")
                   if k in self.model_fields_set]
        if self.bits == 8 and changed:
            raise ValueError(f"model.quantization.{changed[0]} is a 4-bit setting: it does nothing with bits 8")
        return self


# from_pretrained arguments orpo sets itself, and the key that sets each (model.init_kwargs may not)
ORPO_LOAD_ARGS = {
    "dtype": "model.dtype", "torch_dtype": "model.dtype", "revision": "model.revision",
    "trust_remote_code": "model.trust_remote_code", "attn_implementation": "model.attn_implementation",
    "quantization_config": "model.quantization", "load_in_4bit": "model.quantization",
    "load_in_8bit": "model.quantization", "device_map": "train.distributed (orpo places the model)",
    "pretrained_model_name_or_path": "model.name_or_path",
}


class ModelConfig(_Section):
    name_or_path: str | None = Field(
        None,
        description="Hub name or local folder of a causal LM. Exactly one of name_or_path / init (or, in "
        "Python, a model object passed to train()).",
    )
    init: ModelInit | None = Field(
        None, description="Build a fresh model from a config instead, e.g. {arch: llama, hidden_size: 64}."
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub name or folder; default: name_or_path.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype. auto = the checkpoint's own (float32 for init)."
    )
    attn_implementation: str | None = Field(
        None, description="eager | sdpa | flash_attention_2 | ...; default: transformers' choice."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    chat_template: str | None = Field(
        None,
        description="none | chatml | llama3 | zephyr | path/to/template.jinja. Default: the tokenizer's "
        "own, or plain text (none) when it has none.",
    )
    lora: LoraConfig | None = Field(None, description="LoRA settings; omit for full fine-tuning.")
    load_in_4bit: bool = Field(False, description="QLoRA: 4-bit NF4 base weights (needs lora, a GPU, bitsandbytes). "
                               "The same as quantization: {bits: 4}.")
    quantization: QuantizationConfig | None = Field(
        None, description="Quantized base weights through bitsandbytes (QLoRA; needs lora, a GPU), e.g. {bits: 4, "
        "quant_type: fp4}. Default: none, unless load_in_4bit."
    )
    init_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for from_pretrained of the trained model (TRL's model_init_kwargs), "
        "e.g. {low_cpu_mem_usage: true} or a config override such as {rope_parameters: {rope_type: linear, "
        "factor: 2.0, rope_theta: 10000.0}}; not those orpo sets (dtype, revision, ...: their keys).",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of gradient_checkpointing_enable (with gradient_checkpointing), e.g. "
        "{use_reentrant: true}; default: {use_reentrant: false}."
    )

    @model_validator(mode="before")
    @classmethod
    def _four_bit(cls, value: Any) -> Any:
        """A 4-bit ``quantization`` sets ``load_in_4bit`` too: the code that treats 4-bit weights apart
        (placement, FSDP, resume) reads that one key. ``quantized()`` is what loading reads."""
        if not isinstance(value, dict) or value.get("quantization") is None:
            return value
        quant = value["quantization"]
        bits = quant.bits if isinstance(quant, QuantizationConfig) else quant.get("bits", 4) if isinstance(
            quant, dict) else None
        if bits not in (4, 8):
            # not a section, or bits wrong: the field's own validation says so
            return value
        if "load_in_4bit" in value and value["load_in_4bit"] != (bits == 4):
            raise ValueError(f"model.load_in_4bit={value['load_in_4bit']} contradicts model.quantization.bits={bits}: "
                             "set only model.quantization")
        return {**value, "load_in_4bit": bits == 4}

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for key in self.init_kwargs:
            if key in ORPO_LOAD_ARGS:
                raise ValueError(f"model.init_kwargs.{key}: set {ORPO_LOAD_ARGS[key]} instead")
        if self.init_kwargs and self.init is not None:
            raise ValueError("model.init_kwargs are from_pretrained arguments, and model.init loads nothing: put "
                             "config keys in model.init")
        if self.gradient_checkpointing_kwargs is not None and not self.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing_kwargs needs model.gradient_checkpointing: true")
        # neither is allowed: a model object passed to train() in Python (checked when loading)
        if self.name_or_path is not None and self.init is not None:
            raise ValueError("set only one of model.name_or_path and model.init")
        if self.init is not None and self.tokenizer is None:
            raise ValueError("model.init builds a model without a tokenizer: set model.tokenizer too")
        if self.quantization is not None and self.lora is None:
            raise ValueError("model.quantization (QLoRA) trains adapters only: add a model.lora section")
        if self.load_in_4bit and self.lora is None:
            raise ValueError("model.load_in_4bit (QLoRA) trains adapters only: add a model.lora section")
        return self

    def quantized(self) -> QuantizationConfig | None:
        """The quantization to load with: ``quantization``, or today's 4-bit defaults for ``load_in_4bit``."""
        if self.quantization is None and self.load_in_4bit:
            return QuantizationConfig(bits=4)
        return self.quantization


class ColumnMap(_Section):
    prompt: str = Field(..., description="Column holding the prompt text.")
    chosen: str = Field(..., description="Column holding the preferred response.")
    rejected: str = Field(..., description="Column holding the dispreferred response.")


DataFormat = Literal["auto", "standard", "implicit", "conversational", "sharegpt", "columns"]


class DataSource(_Section):
    """One source of a mixture (``data.train: [ ... ]``); unset keys inherit ``data.*``."""

    path: str = Field(..., description="Local file or hub dataset, the same forms as data.train.")
    format: DataFormat | None = Field(None, description="Row format of this source; default data.format.")
    columns: ColumnMap | None = Field(None, description="Column mapping of this source; default data.columns.")
    split: str | None = Field(None, description="Hub split; default data.train_split.")
    subset: str | None = Field(None, description="Hub configuration name; default data.subset.")
    weight: float | None = Field(
        None, gt=0,
        description="Relative share of the mixed training set (all sources weighted, or none); sampled "
        "without replacement, so the source that runs out first sets the size of the mixture.",
    )
    max_samples: int | None = Field(
        None, gt=0, description="Use at most N pairs of this source (a seeded random sample, train.seed)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if self.columns is not None and self.format not in (None, "auto", "columns"):
            raise ValueError(f"columns implies format 'columns', but format is '{self.format}'")
        return self


class DataConfig(_Section):
    train: str | list[DataSource] | None = Field(
        None,
        description="Local .jsonl/.json/.parquet/.csv (optionally .gz), or a hub dataset 'org/name' "
        "('org/name:split' picks a split); or a list of sources to mix, each {path, format, columns, split, "
        "subset, weight | max_samples} (see README, Dataset mixing). Required unless train_data is passed "
        "to train() in Python.",
    )
    train_split: str = Field("train", description="Split of a hub dataset when train has no ':split'.")
    subset: str | None = Field(None, description="Hub dataset configuration name, if it has several.")
    eval: str | None = Field(None, description="Eval data, same forms as train. Exclusive with eval_fraction.")
    eval_split: str = Field("test", description="Split of a hub eval dataset when eval has no ':split'.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this share of train for eval (fixed seed train.seed)."
    )
    format: DataFormat = Field(
        "auto", description="auto | standard | implicit | conversational | sharegpt | columns."
    )
    columns: ColumnMap | None = Field(
        None, description="Column mapping {prompt, chosen, rejected}; implies format: columns."
    )
    max_length: int = Field(1024, gt=1, description="Max tokens of prompt + response, per sequence.")
    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description="Max prompt tokens (cut from the left). Default: what the longer response leaves of "
        "max_length, but at least half of it.",
    )
    min_response_tokens: int = Field(
        1, ge=1, description="Drop a pair when truncation leaves fewer response tokens than this."
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N rows of train (quick runs).")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad row; skip: drop it and count it."
    )
    num_proc: int | None = Field(None, ge=1, description="Worker processes for tokenization.")
    cache_dir: str | None = Field(
        None, description="Tokenized-data cache; default $ORPO_CACHE or ~/.cache/orpo."
    )
    layout: Literal["auto", "padded", "packed", "shared_prompt", "packed_shared_prompt"] = Field(
        "auto",
        description="How pairs become a forward batch (same loss, log-probs and gradients in every one): "
        "auto = the fastest this model can run: packed_shared_prompt, else packed (flash_attention_2), else "
        "padded (a model without position_ids, a sliding window shorter than a row), the choice printed; "
        "padded = 2B right-padded rows (every model and attention backend); packed = the 2B sequences "
        "packed into rows of max_length tokens, no padding (sdpa, eager, flex_attention, "
        "flash_attention_2); shared_prompt = one row [prompt][chosen][rejected] per pair, the prompt "
        "computed once (sdpa, eager, flex_attention); packed_shared_prompt = those rows packed. "
        "See docs/ARCHITECTURE.md, 'Batch layouts'.",
    )
    general_eval: str | None = Field(
        None,
        description="Forgetting monitor: a plain-text file, or JSONL with a 'text' field (optionally .gz). At "
        "each eval its perplexity is logged as eval_general_ppl (documents cut into max_length blocks).",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                f"({self.max_length}) to leave room for the response"
            )
        if self.min_response_tokens >= self.max_length:
            raise ValueError("min_response_tokens must be below max_length")
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set data.eval or data.eval_fraction, not both")
        if self.columns is not None and self.format not in ("auto", "columns"):
            raise ValueError(f"data.columns implies format 'columns', but format is '{self.format}'")
        if self.format == "columns" and self.columns is None:
            raise ValueError("format 'columns' needs data.columns: {prompt: ..., chosen: ..., rejected: ...}")
        if isinstance(self.train, list):
            self._check_mixture(self.train)
        return self

    def _check_mixture(self, sources: list[DataSource]) -> None:
        if not sources:
            raise ValueError("data.train is an empty list; give a file, a hub dataset or sources to mix")
        weighted = [s.weight is not None for s in sources]
        if any(weighted) and not all(weighted):
            missing = ", ".join(s.path for s, w in zip(sources, weighted, strict=True) if not w)
            raise ValueError(f"give every source of data.train a weight, or none (no weight: {missing})")
        if self.max_samples is not None:
            raise ValueError("data.max_samples with a list of sources: set max_samples per source instead")
        for s in sources:
            fmt = s.format or self.format
            if fmt == "columns" and (s.columns or self.columns) is None:
                raise ValueError(f"source {s.path}: format 'columns' needs columns: {{prompt, chosen, rejected}}")

    @property
    def sources(self) -> list[DataSource]:
        """``data.train`` as a list of sources with every inherited key filled in ([] when unset)."""
        if self.train is None:
            return []
        given = [DataSource(path=self.train)] if isinstance(self.train, str) else self.train
        return [
            s.model_copy(update={
                "format": s.format or ("columns" if s.columns is not None else self.format),
                "columns": s.columns or self.columns,
                "split": s.split or self.train_split,
                "subset": s.subset or self.subset,
                "max_samples": s.max_samples if isinstance(self.train, list) else None,
            })
            for s in given
        ]


ObjectiveName = Literal["orpo", "sft", "simpo", "cpo", "dpo"]


class OrpoConfig(_Section):
    """The objective and its settings (the section keeps its name: ORPO is the default objective)."""

    objective: ObjectiveName = Field(
        "orpo",
        description="orpo | sft (NLL on chosen only) | simpo (Meng et al. 2024) | cpo (Xu et al. 2024) | "
        "dpo (Rafailov et al. 2023; reference log-probs from the starting weights, computed once and cached).",
    )
    beta: float = Field(
        0.1,
        ge=0.0,
        validation_alias=AliasChoices("beta", "lambda"),
        description="ORPO's λ, the weight of the odds-ratio term (alias: lambda). 0 = plain SFT on chosen.",
    )
    nll_on_prompt: bool = Field(
        False, description="Also count chosen-prompt tokens in the NLL (TRL's behaviour). Default: response only."
    )
    simpo_beta: float = Field(
        2.0, gt=0.0, description="SimPO's β, the scale of the length-averaged log-prob margin (paper: 2.0-2.5)."
    )
    simpo_gamma: float = Field(
        0.5, ge=0.0, description="SimPO's γ, the target margin (SimPO's code: 0.25 × β; paper: 0.5-1.6)."
    )
    simpo_nll_weight: float = Field(
        0.0, ge=0.0, description="Weight of an NLL term on chosen added to SimPO (its sft_weight; 0 = none)."
    )
    cpo_beta: float = Field(
        0.1, gt=0.0, description="CPO's β on the summed log-prob margin (paper and TRL: 0.1); NLL weight 1."
    )
    dpo_beta: float = Field(
        0.1, gt=0.0, description="DPO's β, the strength of the pull toward the reference (paper and TRL: 0.1)."
    )

    @model_validator(mode="after")
    def _check(self) -> OrpoConfig:
        # A changed setting of another objective would silently do nothing: refuse it.
        for key, owner in OBJECTIVE_KEYS.items():
            default = OrpoConfig.model_fields[key].default
            if owner != self.objective and getattr(self, key) != default:
                raise ValueError(f"orpo.{key} applies to objective '{owner}' only, but orpo.objective is "
                                 f"'{self.objective}': remove it or set orpo.objective={owner}")
        return self


OBJECTIVE_KEYS = {"beta": "orpo", "simpo_beta": "simpo", "simpo_gamma": "simpo", "simpo_nll_weight": "simpo",
                  "cpo_beta": "cpo", "dpo_beta": "dpo"}


SchedulerName = Literal["linear", "cosine", "constant", "inverse_sqrt", "cosine_with_min_lr", "wsd"]
OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "lion"]


def metric_goal(name: str) -> Literal["min", "max"] | None:
    """Whether lower or higher is better for an eval metric (``train.save_best``, ``orpo sweep --sort``).

    Higher: accuracy, margin, log_odds_ratio, logps_chosen (what preference training raises).
    Lower: anything ending in ``loss`` or ``ppl``, and logps_rejected. Anything else (counts such
    as eval_pairs, unknown names): None, and the caller refuses it rather than guess.
    """
    base = name.removeprefix("eval_")
    if base in ("accuracy", "margin", "log_odds_ratio", "logps_chosen"):
        return "max"
    if base.endswith(("loss", "ppl")) or base == "logps_rejected":
        return "min"
    return None


HEALTH_CODES = ("lambda_too_high", "no_separation", "rejected_rising", "instruct_start", "grad_spikes", "forgetting")


class HealthConfig(_Section):
    """Live run-health warnings (``orpo.train.health``): each said once, in metrics.jsonl and the summary.

    The defaults are set so that the quickstart and the short HH runs raise none while the runs
    built to show each failure (tests/test_health.py) do; the reasons are in docs/health.md.
    """

    enabled: bool = Field(True, description="Run the health checks at all.")
    ignore: list[Literal[HEALTH_CODES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Warning codes not to check, e.g. [instruct_start]."
    )
    window: float = Field(
        0.25, gt=0, le=1,
        description="lambda_too_high / rejected_rising compare the evals of the last window x total steps "
        "(at least the last two evals; rejected_rising: rejected_window, rejected_evals): the change from the first "
        "to the last.",
    )
    min_change: float = Field(
        0.05, ge=0,
        description="The smallest change across the window that counts as rising / falling, in the metric's "
        "own units (nats per token for log-probs, the OR loss per pair).",
    )
    nll_rise: float = Field(
        0.05, ge=0,
        description="lambda_too_high: the chosen NLL's rise across the window, as a share of its value at the "
        "window's start, while the odds-ratio loss falls by min_change or more.",
    )
    rejected_start: float = Field(
        0.25, ge=0, le=1,
        description="rejected_rising: judged from this share of training on (every log-prob rises at first).",
    )
    rejected_rise: float = Field(
        0.5, ge=0,
        description="rejected_rising: the rejected log-probs rising by at least this share of the chosen "
        "ones' rise (and by min_change) across the window.",
    )
    rejected_window: float = Field(
        0.5, gt=0, le=1,
        description="rejected_rising: its window, as window is for lambda_too_high; longer, because in a healthy "
        "run the rejected log-probs can tick up over a short span and fall over the next.",
    )
    rejected_evals: int = Field(
        3, ge=2, description="rejected_rising: its window spans at least this many evals (two intervals).",
    )
    separation_after: float = Field(
        0.5, ge=0, le=1, description="no_separation: judged at evals from this share of training on."
    )
    min_eval_pairs: int = Field(
        50, ge=1, description="no_separation: judged only on eval sets of at least this many pairs (on fewer, "
        "0.55 is within a coin's noise: its standard error at 50 pairs is 0.07).",
    )
    min_accuracy: float = Field(
        0.55, ge=0, le=1,
        description="no_separation: eval accuracy at or below this (or a log odds ratio <= 0) warns.",
    )
    spike_factor: float = Field(
        10.0, gt=1,
        description="grad_spikes: a logged gradient norm above this multiple of the median of the "
        "previous spike_window logged norms is a spike.",
    )
    spike_window: int = Field(20, ge=3, description="grad_spikes: logged steps the median is taken over.")
    max_spikes: int = Field(1, ge=1, description="grad_spikes: warn when this many spikes have been seen.")
    forgetting_factor: float = Field(
        1.2, gt=1,
        description="forgetting: eval_general_ppl above this multiple of its step-0 value warns.",
    )
    benchmark_drop: float = Field(
        0.1, gt=0, lt=1,
        description="forgetting: a train.benchmark_tasks metric worse than its step-0 value by more than this share "
        "of it warns (lower, for a metric where higher is better, as lm-eval says of each).",
    )


class EarlyStoppingConfig(_Section):
    """End a run whose eval metric stopped improving (``orpo.train.early_stop``); best/ keeps its best model."""

    metric: str = Field("eval_loss", description="The eval metric judged: any eval_* key of the eval rows.")
    mode: Literal["min", "max"] | None = Field(
        None, description="min: lower is better; max: higher. Default from the metric (max for accuracy, margin, "
        "log_odds_ratio, logps_chosen; min for losses, ppl, logps_rejected); required for any other metric.",
    )
    patience: int = Field(3, ge=1, description="Stop after this many evals in a row without an improvement.")
    threshold: float = Field(
        0.0, ge=0, description="An improvement is a change past the best so far by more than this, in the "
        "metric's units.",
    )

    @model_validator(mode="after")
    def _check(self) -> EarlyStoppingConfig:
        if not self.metric.startswith("eval_"):
            raise ValueError(f"train.early_stopping.metric: '{self.metric}' is not an eval metric (eval_loss, "
                             "eval_accuracy, ...)")
        if self.mode is None and metric_goal(self.metric) is None:
            raise ValueError(f"train.early_stopping.mode: whether '{self.metric}' should go down or up is not "
                             "known: set mode to min or max")
        return self

    def goal(self) -> Literal["min", "max"]:
        """``mode``, or the metric's own direction when unset."""
        goal = self.mode or metric_goal(self.metric)
        assert goal is not None  # refused by _check
        return goal


class TrainConfig(_Section):
    output_dir: str = Field("runs/orpo", description="Where checkpoints, metrics.jsonl and final/ go.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    epochs: float | None = Field(
        None, gt=0, le=MAX_EPOCHS, description="Passes over train when max_steps is unset (default 1)."
    )
    batch_size: int = Field(8, gt=0, description="Pairs per micro-batch (per device).")
    max_tokens_per_batch: int | None = Field(
        None,
        gt=1,
        description="Form training micro-batches by tokens instead: pairs in data order until their "
        "chosen + rejected tokens would pass this budget (a longer pair goes alone); replaces batch_size "
        "for training (eval keeps eval_batch_size). Pairs with data.layout packed*.",
    )
    eval_batch_size: int | None = Field(None, gt=0, description="Pairs per eval batch; default batch_size.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(8e-6, gt=0, description="Peak learning rate.")
    optimizer: OptimizerName = Field(
        "adamw",
        description="adamw (torch) | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit (bitsandbytes, `pip install "
        "orpo[optim]`; paged: CUDA only) | adafactor (torch, factored second moment, no first moment) | lion "
        "(bitsandbytes; one momentum, sign update: the paper uses a 3-10x smaller learning_rate and "
        "adam_beta2=0.99). The table in README.md, Optimizers.",
    )
    optimizer_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More constructor arguments of the optimizer (e.g. amsgrad, min_8bit_size, beta2_decay); "
        "checked against the names it accepts. lr, betas, eps and weight_decay come from the keys here.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay, every optimizer (never on norms, "
                                "biases and embeddings).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="beta1 of AdamW (every variant) and Lion.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="beta2 of AdamW (every variant) and Lion.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon (every variant; Adafactor and Lion have none).")
    lr_scheduler: SchedulerName = Field(
        "linear",
        description="linear | cosine | constant | inverse_sqrt | cosine_with_min_lr (cosine down to "
        "min_lr_ratio x the peak) | wsd (warmup from min_lr_ratio x the peak, stable at the peak, then a cosine "
        "decay over the last decay_ratio of the steps back to min_lr_ratio x the peak).",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, lt=1, description="Final learning rate as a share of the peak, for cosine_with_min_lr and wsd."
    )
    decay_ratio: float = Field(0.1, gt=0, le=1, description="wsd: the share of the steps that decay (after warmup).")
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More arguments of transformers' schedule function (num_cycles for the cosines, timescale "
        "for inverse_sqrt, decay_type / warmup_type for wsd); checked against the names it accepts.",
    )
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps. Exclusive with warmup_ratio.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a share of total steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null = no clip.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast compute dtype (Accelerate); weights stay in model.dtype."
    )
    seed: int = Field(
        42, ge=0, lt=2**32, description="Seed for init, shuffling, the eval split and dropout (0 <= seed < 2**32)."
    )
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    eval_every: int | Literal["epoch"] | None = Field(
        None, description="Evaluate every N optimizer steps, or `epoch`: on the step that completes each epoch's "
        "last micro-batch (with grad_accum, the step it falls in); and at the end either way."
    )
    save_every: int | Literal["epoch"] | None = Field(
        None, description="Checkpoint every N optimizer steps, or `epoch`: on the step that completes each epoch "
        "(as eval_every)."
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep only the newest N checkpoints.")
    checkpoint_on_signal: bool = Field(
        True,
        description="On SIGTERM or SIGINT (pre-emption, Ctrl-C) finish the current step, write a checkpoint and "
        "exit with status 4 (resume with train.resume=auto). false: stop without one unless save_every is set. "
        "A second Ctrl-C aborts at once.",
    )
    resume: str = Field(
        "never",
        description="never | auto (newest complete checkpoint in output_dir) | path to a checkpoint.",
    )
    overwrite: bool = Field(False, description="Start over in an output_dir that holds a run orpo made: removes only "
                            "what that run wrote there (its marker, .orpo.json, lists it); a folder orpo did not make "
                            "is refused either way.")
    max_bad_steps: int = Field(
        10, gt=0, description="Stop after this many consecutive steps with a non-finite loss or grad norm."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers besides metrics.jsonl: tensorboard (OUTPUT_DIR/"
        "tensorboard), wandb, mlflow (MLFLOW_TRACKING_URI, else a SQLite store in OUTPUT_DIR/mlflow), trackio "
        "(TRACKIO_DIR, local by default). Each gets the metrics, the config and the eval samples."
    )
    run_name: str | None = Field(None, min_length=1, max_length=256,
                                 description="The run's name in every tracker; default: output_dir's folder name.")
    project: str = Field("orpo", min_length=1, max_length=256,
                         description="The tracker's project (W&B project, MLflow experiment, Trackio project).")
    tags: list[str] = Field(default_factory=list, max_length=64,
                            description="Tags on the run in every tracker (W&B tags, MLflow tags).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (at most the machine's CPU count).")
    logps: Literal["auto", "chunked", "full"] = Field(
        "auto",
        description="How token log-probs are computed. chunked: from the final hidden states and the LM head's "
        "weights a chunk of whole pairs at a time, never a [tokens, vocab] logits tensor (exact; in training each "
        "chunk's gradient is computed in the forward from the objective's per-pair loss, so no logits are "
        "recomputed; a pair longer than a chunk is a chunk of its own). full: the model's own logits. auto: chunked where the model allows it (a plain linear LM "
        "head, also tied or in lora.modules_to_save; Gemma-2 soft-capping, Cohere/Granite scaling), else full "
        "with a one-line note.",
    )
    logps_chunk_size: int | None = Field(
        None, gt=0, description="Rows per chunk for chunked log-probs; default: ~64 MiB of float32 logits (512 MiB on a GPU)."
    )
    save_final: bool = Field(True, description="Write output_dir/final/ at the end (with a model card, README.md).")
    distributed: Literal["auto", "ddp", "fsdp2", "zero2", "zero3"] = Field(
        "auto",
        description="How several processes share the work: auto (the accelerate config's engine, else ddp "
        "when there are several processes) | ddp | fsdp2 (shard weights, gradients, AdamW state) | "
        "zero2 | zero3 (DeepSpeed). See docs/distributed.md.",
    )
    cpu_offload: bool = Field(
        False, description="Keep what the engine shards in CPU memory (fsdp2, zero2, zero3 only)."
    )
    disable_dropout: bool | None = Field(
        None,
        description="Set every dropout of the model to 0 (nn.Dropout modules, LoRA dropout included, and "
        "attention dropout in the model config). Default (unset): true for objectives with a reference "
        "(DPO: the cached reference log-probs are of the model without dropout, so the policy is compared "
        "alike), else false.",
    )
    eval_generate: int = Field(
        0, ge=0, description="At each eval, greedy completions of the first N eval prompts -> "
        "output_dir/samples.jsonl (and TensorBoard text). 0 = none."
    )
    eval_generate_max_tokens: int = Field(64, gt=0, description="New tokens per eval_generate completion, at most.")
    save_best: str | None = Field(
        None,
        description="Keep output_dir/best/ for the best eval so far of this metric (eval_loss, eval_accuracy, "
        "eval_general_ppl, ...): lowest for losses / ppl / logps_rejected, highest for accuracy, margin, "
        "log_odds_ratio, logps_chosen.",
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        None,
        description="End the run normally (final eval and save, exit status 0, a line in the summary) once the "
        "metric has not improved for patience evals in a row; needs eval_every. best/ keeps the model of the best "
        "eval: save_best, when set, must name the same metric (and direction); unset, early stopping keeps best/ "
        "for its own metric.",
    )
    health: HealthConfig = Field(default_factory=HealthConfig, description="Run-health warnings: the train.health keys below; why each default, docs/health.md.")
    push_to_hub: bool = Field(
        False, description="Push the final model to the Hugging Face Hub repo hub_model_id at the end (main process "
        "only; needs HF_TOKEN or `hf auth login`); a failed push exits non-zero with the run folder intact."
    )
    hub_model_id: str | None = Field(None, description="The hub repo ORG/NAME to push to (required by push_to_hub).")
    hub_private: bool = Field(False, description="Create the hub repo private (an existing repo keeps its visibility).")
    hub_strategy: Literal["end", "every_save"] = Field(
        "end", description="end: push final/ once at the end. every_save: also push the model at each checkpoint "
        "(inline, after the checkpoint is written; a failed checkpoint push is a warning, the run goes on)."
    )
    torch_compile: bool = Field(
        False, description="Compile the model's forward with torch.compile (the first steps are slower while it "
        "compiles; saved files are those of the plain model)."
    )
    use_liger_kernel: bool = Field(
        False, description="Swap in Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA only, `pip install "
        "liger-kernel`); not its fused loss, since orpo computes log-probs with its own chunked head."
    )
    benchmark_tasks: list[str] = Field(
        default_factory=list, max_length=64,
        description="lm-evaluation-harness tasks run on the live model at step 0, every benchmark_every steps and "
        "at the end, as `orpo benchmark --tasks` runs them (any lm-eval task name, orpo's offline ifeval, "
        "or a task YAML of train.benchmark_include_path); logged as bench_<task>_<metric> in metrics.jsonl and "
        "the trackers, plotted by `orpo report`, listed in the model card and watched by the forgetting warning "
        "(train.health.benchmark_drop). Needs `pip install orpo[eval]`.",
    )
    benchmark_every: int | Literal["epoch"] | None = Field(
        None, description="Run train.benchmark_tasks every N optimizer steps, or `epoch` (as eval_every); unset: at "
        "step 0 and at the end only."
    )
    benchmark_limit: int | float | None = Field(
        None, gt=0, description="Documents per benchmark task, as lm-eval's --limit: a count, or a share when below "
        "1 (the first documents of each task, the same at every run). null = all of them."
    )
    benchmark_max_new_tokens: int = Field(
        256, gt=0, description="New tokens per answer of a generative benchmark task (ifeval), at most."
    )
    benchmark_include_path: str | None = Field(
        None, description="A folder of local lm-eval task YAMLs for train.benchmark_tasks (as --include-path)."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: add uniform noise of scale alpha / sqrt(seq_len * hidden_size) to the "
        "input embeddings in training forwards (never in eval, generation or the DPO reference pass); "
        "the paper uses 5-15. null = off."
    )

    @field_validator("output_dir")
    @classmethod
    def _expand_output_dir(cls, value: str) -> str:
        """``~/run`` and ``$RUNS/x`` mean what a shell means, not a folder literally named ``~``."""
        return os.path.expandvars(os.path.expanduser(value))

    @field_validator("resume")
    @classmethod
    def _expand_resume(cls, value: str) -> str:
        return value if value in ("never", "auto") else os.path.expandvars(os.path.expanduser(value))

    @field_validator("eval_every", "save_every", "benchmark_every", mode="before")
    @classmethod
    def _every(cls, value: Any) -> Any:
        """One plain message for a bad cadence, not one per branch of the union."""
        if value is None or value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"{value!r} is neither a number of optimizer steps > 0 nor 'epoch'")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        cpus = os.cpu_count() or 1
        if value > cpus:
            raise ValueError(f"{value} DataLoader workers, but this machine has {cpus} CPUs: use at most {cpus}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        if self.save_best is not None and (not self.save_best.startswith("eval_") or metric_goal(self.save_best) is None):
            raise ValueError(f"train.save_best: '{self.save_best}' is not an eval metric with a known direction; use "
                             "eval_loss, eval_accuracy, eval_margin, eval_log_odds_ratio, eval_nll_loss, "
                             "eval_general_ppl, ... (an eval_* loss or ppl is minimized, accuracy/margin maximized)")
        if self.benchmark_every is not None and not self.benchmark_tasks:
            raise ValueError("train.benchmark_every is when train.benchmark_tasks run: name the tasks too")
        if self.benchmark_limit is not None and self.benchmark_limit > 1 and self.benchmark_limit != int(
                self.benchmark_limit):
            raise ValueError(f"train.benchmark_limit {self.benchmark_limit}: a count of documents (a whole number) "
                             "or a share below 1")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("train.push_to_hub needs train.hub_model_id: the hub repo to push to, as ORG/NAME")
        if self.push_to_hub and not self.save_final:
            raise ValueError("train.push_to_hub pushes final/: it needs train.save_final true")
        if self.hub_model_id is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", self.hub_model_id):
            raise ValueError(f"train.hub_model_id: '{self.hub_model_id}' is not a hub repo id ORG/NAME")
        return self

    @model_validator(mode="after")
    def _check_early_stopping(self) -> TrainConfig:
        es = self.early_stopping
        if es is None:
            return self
        if self.eval_every is None:
            raise ValueError("train.early_stopping judges the evals: set train.eval_every (N steps or epoch)")
        if self.save_best is not None and (self.save_best != es.metric or metric_goal(self.save_best) != es.goal()):
            raise ValueError(f"train.early_stopping.metric '{es.metric}' ({es.goal()}) and train.save_best "
                             f"'{self.save_best}' differ: best/ would not hold the model early stopping judged best; "
                             "set save_best to the same metric, or leave it unset (early stopping then keeps best/)")
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)  # empty: a model object given to train()
    data: DataConfig = Field(default_factory=DataConfig)  # empty: train_data given to train()
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        has_eval = self.data.eval is not None or self.data.eval_fraction > 0
        # without data.train, rows come from Python (eval_data too): the trainer checks then
        if self.train.eval_every is not None and not has_eval and self.data.train is not None:
            raise ValueError("train.eval_every needs eval data: set data.eval or data.eval_fraction")
        flash = "flash" in (self.model.attn_implementation or "")
        if flash and self.data.layout in ("shared_prompt", "packed_shared_prompt"):
            raise ValueError(f"data.layout {self.data.layout} needs an attention mask, which "
                             f"{self.model.attn_implementation} does not take: use data.layout packed, or "
                             "model.attn_implementation sdpa | eager | flex_attention")
        if self.train.eval_generate and not has_eval:
            raise ValueError("train.eval_generate needs eval data: set data.eval or data.eval_fraction")
        if self.train.save_best is not None and not has_eval:
            raise ValueError("train.save_best needs eval data: set data.eval or data.eval_fraction")
        if self.data.general_eval is not None and not has_eval:
            raise ValueError("data.general_eval is measured at each eval: set data.eval or data.eval_fraction")
        return self


# ---------------------------------------------------------------------------------------------
# Loading


# a model.init key that sizes the model (and its memory): hidden_size, num_hidden_layers, n_head, d_model, ...
_SIZE_KEY = re.compile(r"(^|_)(size|dim|layers|heads|experts|embeddings|positions|ctx|inner|embd|layer|head)$"
                       r"|^(num|n|d)_")


def _check_init(init: dict[Any, Any]) -> None:
    """``model.init`` takes free keys (they go to the transformers config and into every config.json), so bound
    them here: JSON values only, nested at most MAX_INIT_DEPTH, at most MAX_INIT_JSON as JSON, finite floats,
    sizes integers in [0, MAX_SIZE]. Stops early, so a structure that shares sublists (an alias bomb) is never
    walked in full."""
    budget = MAX_INIT_JSON

    def walk(value: Any, path: str, depth: int) -> None:
        nonlocal budget
        where = path or "model.init"
        if isinstance(value, dict | list | tuple):
            if depth > MAX_INIT_DEPTH:
                raise ValueError(f"{where}: nested deeper than {MAX_INIT_DEPTH} levels")
            budget -= 2
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(value, dict) and not isinstance(key, str):
                    raise ValueError(f"{where}: key {short(key)!r} is not a string")
                budget -= len(str(key)) + 4
                walk(item, f"{path}.{key}" if path else str(key), depth + 1)
                if budget < 0:
                    break
        elif value is None or isinstance(value, bool | int | float | str):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where}: {value} is not a finite number")
            budget -= len(json.dumps(value)) if isinstance(value, str) else len(str(value))
        else:
            raise ValueError(f"{where}: a {type(value).__name__} is not a JSON value (give a number, string, "
                             "true/false, null, list or mapping)")
        if budget < 0:
            raise ValueError(f"larger than {MAX_INIT_JSON} bytes as JSON: a model config is a few hundred")
        name = path.rsplit(".", 1)[-1]
        # true / false under such a name is a flag (tie_word_embeddings), null a default: not sizes
        if path and _SIZE_KEY.search(name) and not isinstance(value, dict | list | tuple | bool | None):
            if not isinstance(value, int):
                raise ValueError(f"{where}: a size must be an integer, got {short(value)!r}")
            if not 0 <= value <= MAX_SIZE:
                raise ValueError(f"{where}: {short(value)} is outside 0..{MAX_SIZE} (2**20), the range of a size")

    walk(init, "", 1)


def _yaml(text: str | None, source: str, path: Path | None = None) -> Any:
    """``yaml_input``'s bounded reading (of ``text``, or of the file ``path``), its refusals as ConfigError."""
    try:
        return read_yaml(read_text(path) if path is not None else text or "", source)
    except YAMLInputError as e:
        raise ConfigError(str(e)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[a, b]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{short(item)}' is not of the form key.path=value")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{short(item)}': '{short(k)}' is not a section")
            node = child
        node[keys[-1]] = _yaml(value, f"override {short(path.strip())}") if value != "" else None
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (or a dict), apply dotted overrides, validate. Raises ConfigError."""
    if raw is None:
        if path is None:
            raise ConfigError("no configuration given")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = _yaml(None, str(p), path=p) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping with sections model, data, orpo, train")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=str(path) if path else "config", data=raw)) from None


# the branch tags pydantic puts in a union's error locations (`str`, `list[str]`, `function-after[...]`);
# a user's key such as "d[ata" is not one of them
_UNION_TAG = re.compile(r"str|int|float|bool|none|[a-z][\w-]*\[.*\]")


def _user_location(loc: tuple, data: Any) -> tuple:
    """``loc`` without pydantic's branch tags. A part that is a key (or index) of the validated
    ``data`` at that point is the user's, whatever it looks like ("d[ata"); only a part that is not,
    and looks like a tag, is dropped. Without ``data``, every part that looks like a tag is."""
    out, here, known = [], data, data is not None
    for part in loc:
        if known and isinstance(here, dict) and part in here:
            out.append(part)
            here = here[part]
        elif known and isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here):
            out.append(part)
            here = here[part]
        elif isinstance(part, str) and _UNION_TAG.fullmatch(part):
            continue
        else:
            # past what the user wrote (a missing key, a default): nothing more to compare with
            out.append(part)
            known = False
    return tuple(out)


def format_validation_error(err: ValidationError, source: str, data: Any = None) -> str:
    """One line for one mistake; several are listed one per line under a header."""
    lines = [f"{source}: invalid configuration"]
    # pydantic tags a union's branches and validators in the location (`str`, `list[...]`,
    # `function-after[...]`): drop them, and drop "wrong type" for a branch whose sibling got deeper
    errors = [(_user_location(e["loc"], data), e) for e in err.errors()]
    deeper = {o[:i] for o, _ in errors for i in range(len(o))}  # every proper prefix: linear, not quadratic
    errors = [(loc, e) for loc, e in errors if not (e["type"].endswith("_type") and loc in deeper)]
    # a list of 100,000 wrong items is one mistake: show the first MAX_ERRORS, count the rest
    more = len(errors) - MAX_ERRORS
    for clean, e in errors[:MAX_ERRORS]:
        loc = ".".join(str(x) for x in clean)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            hint = _suggest(clean)
            msg = "unknown key" + (f" (did you mean '{hint}'?)" if hint else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc or '<top>'}: {msg}")
    if more > 0:
        lines.append(f"  ... and {more} more")
    if len(lines) == 2:
        # one mistake, one line: what a shell, a log line or a CI annotation shows whole
        return f"{source}: {lines[1].strip()} (every key and its default: docs/configuration.md)"
    lines.append("  see docs/configuration.md for every key and its default")
    return "\n".join(lines)


def _suggest(loc: tuple) -> str | None:
    import difflib

    if not loc:
        return None

    def section(ann: Any) -> type[BaseModel] | None:
        """The section class inside an annotation (``X | None``, ``str | list[X]``)."""
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
        return next((m for a in getattr(ann, "__args__", ()) if (m := section(a)) is not None), None)

    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: same section
            continue
        field = model.model_fields.get(str(part))
        sub = section(field.annotation) if field is not None else None
        if sub is None:
            return None
        model = sub
    names = list(model.model_fields)
    for f in model.model_fields.values():
        if isinstance(f.validation_alias, AliasChoices):
            names += [a for a in f.validation_alias.choices if isinstance(a, str)]
    match = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return match[0] if match else None


def config_doc() -> str:
    """Markdown reference of every key, its default and its description."""
    out = ["# Configuration reference", "",
           "Generated from `orpo/config.py` (`orpo config-doc`). Override any key on the command line:",
           "`orpo train CONFIG.yaml train.max_steps=100 orpo.beta=0.2`.", ""]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("model", ModelConfig), ("model.lora", LoraConfig), ("model.quantization", QuantizationConfig),
        ("model.init", ModelInit),
        ("data", DataConfig), ("data.train[]", DataSource), ("data.columns", ColumnMap), ("orpo", OrpoConfig),
        ("train", TrainConfig), ("train.health", HealthConfig), ("train.early_stopping", EarlyStoppingConfig),
    ]
    for name, cls in sections:
        out += [f"## `{name}`", "", "| key | default | description |", "|---|---|---|"]
        for key, f in cls.model_fields.items():
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            desc = (f.description or "").replace("|", "\\|")
            out.append(f"| `{key}` | `{default}` | {desc} |")
        out.append("")
    return "\n".join(out)
