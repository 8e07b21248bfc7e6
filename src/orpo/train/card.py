"""The model card written into ``final/`` (and ``best/``) as ``README.md``.

Hugging Face reads the YAML front matter (``base_model``, ``datasets``, ``tags``, ``library_name``,
``license``, ``pipeline_tag``) when the folder is pushed to the hub; the body says how the model
was made: the eval numbers of the saved step, the run-health warnings, the data summary (with the
data checks' findings when the pipeline made them) and the full configuration.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from orpo.config import Config

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".gz", ".txt", ".arrow", ".safetensors")


def hub_id(spec: str | None) -> str | None:
    """``spec`` as a hub repository id (``org/name``, a ``:split`` dropped), or None for a local path."""
    if not spec:
        return None
    name = spec.split(":", 1)[0]
    if Path(name).exists() or not HUB_ID.match(name) or name.endswith(FILE_SUFFIXES):
        return None
    return name


def _data_specs(cfg: Config) -> list[str]:
    """The data the run read: ``data.train`` (one spec or a mixture's sources) and ``data.eval``."""
    train = cfg.data.train
    specs = [train] if isinstance(train, str) else [getattr(s, "path", s) for s in (train or [])]
    return [s for s in [*specs, cfg.data.eval] if isinstance(s, str)]


def base_license(name: str | None, revision: str | None = None) -> str | None:
    """The base model's license from its own model card, when that card is on this machine (a local
    folder, or the hub cache; never a download)."""
    if not name:
        return None
    card = Path(name) / "README.md"
    if not card.is_file() and hub_id(name):
        try:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(name, "README.md", revision=revision, local_files_only=True))
        except Exception:  # not cached, offline, no card: the license is simply unknown
            return None
    if not card.is_file():
        return None
    meta = front_matter(card.read_text(encoding="utf-8", errors="replace"))
    value = meta.get("license")
    return value if isinstance(value, str) else None


def front_matter(text: str) -> dict[str, Any]:
    """The YAML block between the leading ``---`` lines of a model card (empty if none)."""
    m = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def _objective(cfg: Config) -> str:
    if cfg.orpo.objective == "orpo":
        return f"ORPO (odds ratio preference optimization, λ = {cfg.orpo.beta:g})"
    return f"the `{cfg.orpo.objective}` objective (`orpo.objective`)"


def model_card(cfg: Config, *, step: int, eval_row: dict[str, Any] | None, summary: Any, warnings: dict[str, str],
               adapter: bool, benchmarks: dict[str, Any] | None = None) -> str:
    """README.md text for a saved model; ``summary``: the run's ``DataSummary`` (or None); ``benchmarks``:
    the record of ``train.benchmark_tasks`` (``orpo.train.benchmarks``: baseline, last, last_step)."""
    name = cfg.model.name_or_path
    base = hub_id(name)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    datasets = sorted({d for d in (hub_id(s) for s in _data_specs(cfg)) if d})
    if datasets:
        meta["datasets"] = datasets
    meta["library_name"] = "peft" if adapter else "transformers"
    license_ = base_license(name, cfg.model.revision)
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["orpo", "preference-optimization", *(["lora"] if adapter else [])]

    start = (f"`{name}`" if name else "a freshly initialized "
             f"{cfg.model.init.arch if cfg.model.init else ''} model (`model.init`)")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {Path(cfg.train.output_dir).name}", "",
             f"Trained from {start} with {_objective(cfg)} "
             f"by `orpo train`; this folder holds the {'LoRA adapter' if adapter else 'model'} at step {step}.", ""]

    lines += ["## Evaluation", ""]
    if eval_row:
        lines += [f"On the eval set at step {eval_row['step']}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('eval_')} | {_fmt(v)} |" for k, v in eval_row.items() if k.startswith("eval_")]
    else:
        lines.append("No eval set was configured.")
    lines.append("")

    if benchmarks and benchmarks.get("last"):
        lines += _benchmark_lines(cfg, benchmarks)

    lines += ["## Run-health warnings", ""]
    lines += [f"- `{code}`: {message}" for code, message in warnings.items()] or ["None were raised."]
    lines.append("")

    if summary is not None:
        lines += ["## Data", "", "```", summary.render(), "```", ""]
        checks = getattr(summary, "checks", None)
        if checks:
            lines += ["Data checks (as `orpo audit --json` names them):", "", "```yaml",
                      yaml.safe_dump(checks, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]

    lines += ["## Configuration", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(lines)


def _benchmark_lines(cfg: Config, record: dict[str, Any]) -> list[str]:
    """The lm-eval numbers of the latest benchmark run beside step 0's (``train.benchmark_tasks``)."""
    last, base = record["last"], record.get("baseline", {})
    docs = record.get("docs") or {}
    scored = ", ".join(f"`{t}` {docs[t]}" for t in docs) or "all"
    lines = ["## Benchmarks", "",
             f"lm-evaluation-harness tasks {', '.join(f'`{t}`' for t in cfg.train.benchmark_tasks)} on the model during "
             f"training (documents scored: {scored}):", "",
             f"| metric | step {record.get('baseline_step', 0)} | step {record['last_step']} | stderr |", "|---|---|---|---|"]
    for name, value in last.items():
        if name.endswith("_stderr"):
            continue
        err = last.get(f"{name}_stderr")
        lines.append(f"| {name.removeprefix('bench_')} | {_fmt(base.get(name, '-'))} | {_fmt(value)} | "
                     f"{_fmt(err) if err is not None else '-'} |")
    return [*lines, ""]
