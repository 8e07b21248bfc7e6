"""The one place models and tokenizers are loaded from a folder or the hub, for every command.

Why: ``from_pretrained`` fails in a dozen ways (a typo in a path, offline, a gated repo, an
encoder, out of memory), each as a traceback from deep inside transformers or huggingface_hub.
Here each becomes a ``ModelLoadError``: one line that names the key or flag the user set and what
to do. Folders are classified before anything is loaded (cheap, no network); what only the hub
can say is read from the exception chain afterwards. The original exception stays the
``__cause__`` (``orpo --verbose`` or ``ORPO_DEBUG=1`` prints it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from orpo.config import ConfigError

Want = Literal["model", "tokenizer", "adapter", "model or adapter"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TRAIN_MEMORY_KEYS = ("use less with model.dtype=bfloat16 (half of float32), model.load_in_4bit=true with model.lora "
                     "(QLoRA), or train.distributed=fsdp2 over several GPUs (shards the weights)")
CLI_MEMORY_KEYS = ("free some, or load it in Python with load_for_inference(NAME, dtype='bfloat16') (half of "
                   "float32)")
FLAG_MEMORY_KEYS = "free some, or load it with --dtype bfloat16 (half of float32)"


class ModelLoadError(ConfigError):
    """A model or tokenizer that cannot be loaded, said in one line (the CLI exits 2)."""


@dataclass(frozen=True)
class Source:
    """What is loaded, and the names the messages give it: the key or flag the user set and the
    keys that would change the outcome (the CLI commands have no flag for some of them)."""

    name: str
    key: str
    want: Want = "model"
    revision: str | None = None
    revision_key: str = "model.revision"
    trust_key: str = "model.trust_remote_code=true"
    memory_keys: str = TRAIN_MEMORY_KEYS

    @property
    def label(self) -> str:
        """``model.name_or_path=./x`` for a config key, ``--model ./x`` for a flag or an argument."""
        return f"{self.key}={self.name}" if self.key.startswith("model.") else f"{self.key} {self.name}"


def cli_source(name: str, key: str, want: Want, revision: str | None = None, flags: bool = False) -> Source:
    """A source named by a command-line flag. ``flags``: the command has ``--trust-remote-code``,
    ``--dtype`` and ``--revision`` (eval, generate, merge), and the messages name them; the others
    have none (a hub name loads its main branch)."""
    if flags:
        return Source(name, key, want, revision=revision, revision_key="--revision",
                      trust_key="--trust-remote-code (trust_remote_code=True in Python)", memory_keys=FLAG_MEMORY_KEYS)
    trust_key = "load_for_inference(NAME, trust_remote_code=True) in Python (no flag for it)"
    return Source(name, key, want, revision=revision, trust_key=trust_key, memory_keys=CLI_MEMORY_KEYS)


def check_revision(source: Source) -> None:
    """A revision the user gave for a local folder would be ignored (a folder has one version): refuse it."""
    if source.revision is not None and looks_local(source.name):
        raise ModelLoadError(f"{source.revision_key} {source.revision}: {source.label} is a local folder, which has "
                             f"no revisions: drop {source.revision_key} (it is for hub names)")


def looks_local(name: str) -> bool:
    """A path the user typed (``./``, ``../``, ``/``, ``~``) or one that exists: never a hub name."""
    return name.startswith(("./", "../", "/", "~")) or name in (".", "..") or Path(name).expanduser().exists()


def local_path(name: str) -> str:
    """The name to give ``from_pretrained``: a ``~`` path expanded (transformers would take it for a
    hub name), anything else as it is."""
    return str(Path(name).expanduser()) if name.startswith("~") else name


def check_source(source: Source, trust_remote_code: bool = False) -> None:
    """Raise ``ModelLoadError`` if a local folder cannot hold what is wanted; a hub name passes.

    Reads only the folder listing and ``config.json``, so a wrong folder is named before minutes of
    loading, and a path is never sent to the hub as a repo id.
    """
    name, want = source.name, source.want
    if want != "adapter" and not looks_local(name):
        return
    path = Path(local_path(name))
    if not path.exists():
        raise ModelLoadError(f"{source.label}: no such folder ({path.absolute()}); a path is never looked up on "
                             "the hub: check the path")
    if not path.is_dir():
        raise ModelLoadError(f"{source.label}: is a file, not a folder: give the folder that holds config.json "
                             "and the weights")
    files = sorted(p.name for p in path.iterdir())
    is_adapter, is_model = "adapter_config.json" in files, "config.json" in files
    tokenizer_files = [f for f in TOKENIZER_FILES if f in files]
    if want == "tokenizer":
        if not tokenizer_files:
            raise ModelLoadError(f"{source.label}: no tokenizer in the folder (no tokenizer.json or "
                                 f"tokenizer_config.json; {_contents(files)})")
        return
    if is_adapter and want == "model":
        raise ModelLoadError(f"{source.label}: is a LoRA adapter (adapter_config.json), not a full model: "
                             f"orpo eval/generate --model take it as it is; to train from it, fold it into its "
                             f"base with `orpo merge {name} OUT` and set model.name_or_path=OUT")
    if want == "adapter" and not is_adapter:
        if is_model:
            raise ModelLoadError(f"{source.label}: not an adapter; it is already a full model (config.json, no "
                                 "adapter_config.json): nothing to merge, use the folder as it is")
        raise ModelLoadError(f"{source.label}: not an adapter (no adapter_config.json; {_contents(files)}): "
                             "give the folder a LoRA run wrote, e.g. OUTPUT_DIR/final")
    if is_adapter:
        return
    if not is_model:
        if tokenizer_files:
            raise ModelLoadError(f"{source.label}: holds a tokenizer only ({', '.join(tokenizer_files)}), no model "
                                 "(no config.json): use it as model.tokenizer, with the model in "
                                 "model.name_or_path or model.init")
        if not files:
            raise ModelLoadError(f"{source.label}: the folder is empty: give a model folder (config.json and the "
                                 "weights, e.g. a run's final/) or a hub name")
        raise ModelLoadError(f"{source.label}: no config.json, not a model folder ({_contents(files)}): give the "
                             "folder that holds config.json and the weights (e.g. a run's final/)")
    check_architecture(source, _read_config(source, path / "config.json"), trust_remote_code)


def check_architecture(source: Source, config: dict[str, Any], trust_remote_code: bool) -> None:
    """The model in ``config.json`` must be a causal LM transformers can build, or bring its own code
    (``auto_map``) that the user allowed: the same rule ``AutoModelForCausalLM`` applies, said earlier."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    remote = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if remote and trust_remote_code:
        return
    if model_type not in CONFIG_MAPPING_NAMES:
        if config.get("auto_map") and trust_remote_code:
            return
        if config.get("auto_map"):
            raise ModelLoadError(f"{source.label}: its model_type {model_type!r} is not one transformers "
                                 f"{transformers.__version__} knows and it brings its own code (auto_map), which "
                                 f"runs only with {source.trust_key}: set it if you trust that code")
        raise ModelLoadError(f"{source.label}: config.json has model_type {model_type!r}, which transformers "
                             f"{transformers.__version__} does not know: check config.json, or upgrade transformers")
    # Encoders (BERT, RoBERTa, ...) and encoder-decoders have an "LM head" class in the causal mapping,
    # usable only as a decoder (is_decoder); orpo trains decoder-only language models.
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder or config.get("is_encoder_decoder"):
        arch = ", ".join(config.get("architectures") or []) or model_type
        raise ModelLoadError(f"{source.label}: is a {model_type} model ({arch}), not a causal language model: orpo "
                             "needs a decoder-only LM (AutoModelForCausalLM: Llama, Qwen2, Mistral, GPT-2, ...)")


@contextmanager
def explained(source: Source) -> Iterator[None]:
    """Turn what ``from_pretrained`` raises into one ``ModelLoadError`` line, the original as its cause.

    Errors that are not about loading (a bug: ``TypeError``, ``AttributeError``, ...) pass unchanged.
    """
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, MemoryError, ImportError) as err:
        message = explain(err, source)
        if message is None:
            raise
        raise ModelLoadError(message) from err


def load(loader: Callable[..., Any], source: Source, **kwargs: Any) -> Any:
    """``loader(name, **kwargs)`` (a ``from_pretrained``) after ``check_source``, failures explained.

    ``revision`` is passed only for a hub name: a local folder has none.
    """
    check_source(source, trust_remote_code=bool(kwargs.get("trust_remote_code")))
    name = local_path(source.name) if looks_local(source.name) else source.name
    if source.revision is not None and not looks_local(source.name):
        kwargs["revision"] = source.revision
    with explained(source):
        return loader(name, **kwargs)


def load_adapter(adapter_dir: str, base: Source, **kwargs: Any) -> Any:
    """A LoRA adapter folder on its base model, loaded as ``base`` says (its revision included, which
    ``AutoPeftModelForCausalLM`` takes only from adapter_config.json). ``kwargs`` go to the base's
    ``from_pretrained``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo.train.model import peft_deprecations_silenced

    model = load(AutoModelForCausalLM.from_pretrained, base, **kwargs)
    folder = Path(local_path(adapter_dir))
    with explained(base), peft_deprecations_silenced():
        if (folder / "tokenizer_config.json").is_file():
            # as AutoPeftModelForCausalLM does: tokens added in training grew the embedding
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=bool(kwargs.get("trust_remote_code")))
            if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))
        return PeftModel.from_pretrained(model, str(folder))


def adapter_base(source: Source) -> Source:
    """The base model an adapter folder names (``base_model_name_or_path``), as a source of its own,
    so a base that cannot be loaded is named as the base, not as the adapter."""
    config = _read_config(source, Path(local_path(source.name)) / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{source.label}: adapter_config.json names no base_model_name_or_path")
    return replace(source, name=str(base), key=f"the base model of {source.label} (base_model_name_or_path)",
                   want="model", revision=config.get("revision"))


def explain(err: BaseException, source: Source) -> str | None:
    """The one line for ``err`` raised while loading ``source``, or None if it is not a loading failure.

    huggingface_hub's error classes are looked for along the chain first (transformers wraps them in
    ``OSError``); transformers' own messages are matched as text only where it has no class.
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    label, name = source.label, source.name
    chain = _chain(err)
    found = {type(e) for e in chain}

    def has(*classes: type) -> bool:
        return any(issubclass(t, classes) for t in found)

    text = " ".join(" ".join(str(e).split()) for e in chain)
    status = next((e.response.status_code for e in chain if isinstance(e, hub.HfHubHTTPError)
                   and getattr(e, "response", None) is not None), None)
    if _is_oom(chain):
        return _out_of_memory(source, chain)
    if has(hub.GatedRepoError):
        return (f"{label}: a gated model this account has no access to: accept its license on "
                f"{constants.ENDPOINT}/{name}, then log in with `hf auth login` or set HF_TOKEN")
    if has(hub.RevisionNotFoundError):
        if source.revision is None:
            return f"{label}: the hub has no main branch of it (an empty repo?): check the name"
        return (f"{label}: has no revision {source.revision!r} ({source.revision_key}): give a branch, tag or "
                "commit it has")
    if has(hub.RepositoryNotFoundError):
        return (f"{label}: no such model on the hub ({constants.ENDPOINT}), or it is private (HTTP {status}): check "
                "the name (namespace/model); for a private model, log in with `hf auth login` or set HF_TOKEN")
    if status in (401, 403):
        return (f"{label}: the hub refused access (HTTP {status}): if it is gated or private, accept its license "
                f"on {constants.ENDPOINT}/{name}, then log in with `hf auth login` or set HF_TOKEN")
    if has(hub.RemoteEntryNotFoundError):
        return (f"{label}: the hub has it but not the file transformers needs ({_missing_file(text)}): it is "
                "not a transformers model folder (or not at that revision)")
    if has(hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError) or "couldn't connect to" in text:
        cache = constants.HF_HUB_CACHE
        if source.revision is not None:
            cache += f" at revision {source.revision!r}, {source.revision_key}"
        if constants.HF_HUB_OFFLINE:
            return (f"{label}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading "
                    f"it: download it first with `hf download {name}` (or `huggingface-cli download {name}`) "
                    "where there is network, or unset HF_HUB_OFFLINE")
        return (f"{label}: the hub ({constants.ENDPOINT}) cannot be reached and it is not in the cache ({cache}): "
                f"check the network, or download it first with `hf download {name}` where there is network")
    if has(hub.HFValidationError):
        return (f"{label}: neither an existing folder nor a hub name (namespace/model): check the path or "
                "the name")
    if "trust_remote_code" in text:
        return (f"{label}: it brings its own model code, which runs only with {source.trust_key}: set it if you "
                "trust that code")
    if "Unrecognized configuration class" in text or "Unrecognized model" in text:
        return f"{label}: not a causal language model transformers can load as one ({_clip(text)})"
    if isinstance(err, ImportError):
        return None
    if isinstance(err, OSError | ValueError) and not isinstance(err, ConfigError):
        return f"{label}: cannot be loaded: {_clip(str(err))}"
    return None


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and every exception it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_oom(chain: list[BaseException]) -> bool:
    import torch

    for e in chain:
        if isinstance(e, torch.OutOfMemoryError | MemoryError):
            return True
        if isinstance(e, RuntimeError) and any(s in str(e).lower() for s in ("out of memory", "can't allocate memory",
                                                                                "cannot allocate memory")):
            return True
    return False


def _out_of_memory(source: Source, chain: list[BaseException]) -> str:
    """The size the weights take against what is free on the device that ran out, and what lowers it."""
    import torch

    on_gpu = any(isinstance(e, torch.OutOfMemoryError) or "CUDA" in str(e) for e in chain)
    need = weights_size(source)
    need_text = f"the weights take {_gib(need)} on disk" if need else "the size of the weights is unknown here"
    free = free_memory(on_gpu)
    free_text = f"{_gib(free)} {'of GPU memory' if on_gpu else 'of RAM'} are free" if free is not None else (
        "how much is free is unknown")
    return (f"{source.label}: out of {'GPU' if on_gpu else 'CPU'} memory while loading: {need_text} and "
            f"{free_text}; {source.memory_keys}")


def weights_size(source: Source) -> int | None:
    """Bytes of the weight files of a local folder, or of a hub model's cached snapshot."""
    folder = Path(local_path(source.name))
    if not looks_local(source.name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.name, "config.json", revision=source.revision)
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    total = sum(p.stat().st_size for p in (safetensors or files))
    return total or None


def free_memory(on_gpu: bool) -> int | None:
    """Bytes free on the current GPU, or available RAM."""
    import torch

    if on_gpu:
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _read_config(source: Source, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{source.label}: {path.name} cannot be read ({_clip(str(err))})") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{source.label}: {path.name} is not a JSON object")
    return config


def _contents(files: list[str]) -> str:
    return "the folder is empty" if not files else f"it holds {_listing(files)}"


def _listing(files: list[str]) -> str:
    return ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")


def _missing_file(text: str) -> str:
    for candidate in ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer_config.json"):
        if candidate in text:
            return candidate
    return "a file"


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."

