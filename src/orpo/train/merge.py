"""``orpo merge``: fold a trained LoRA adapter into its base model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer

from orpo import disk
from orpo.config import ConfigError
from orpo.loading import adapter_base, check_revision, check_source, cli_source, load, load_adapter
from orpo.train.checkpoint import quiet_saving
from orpo.train.model import DTYPES


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
               trust_remote_code: bool = False, revision: str | None = None) -> Path:
    """Fold a LoRA adapter into its base model and write a standard HF model folder (atomically).

    The base is the adapter config's ``base_model_name_or_path``, at ``revision`` if given (a hub
    base), else at the config's own. The tokenizer saved next to the adapter (with its chat
    template) is copied along, so ``out_dir`` is ready for ``from_pretrained``.
    """
    adapter_dir, out_dir = disk.expand(adapter_dir), disk.expand(out_dir).absolute()
    # checked before minutes of loading, not after
    disk.inspect_folder(out_dir, "model", "orpo merge OUT")
    if out_dir == adapter_dir.absolute() or adapter_dir.absolute().is_relative_to(out_dir):
        raise ConfigError(f"orpo merge OUT: {out_dir} holds the adapter {adapter_dir}; write the merged model elsewhere")
    source = cli_source(str(adapter_dir), "ADAPTER", "adapter", flags=True)
    check_source(source)
    base = adapter_base(source)
    if revision is not None:
        base = replace(base, revision=revision)
        check_revision(base)
    check_source(base, trust_remote_code=trust_remote_code)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    model = load_adapter(str(adapter_dir), base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload()
    with disk.publish_owned(out_dir, "model", "orpo merge OUT") as tmp, quiet_saving():
        merged.save_pretrained(tmp)
        if (adapter_dir / "tokenizer_config.json").is_file():
            load(AutoTokenizer.from_pretrained, replace(source, want="tokenizer")).save_pretrained(tmp)
    return out_dir
