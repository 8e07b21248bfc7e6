"""lm-evaluation-harness on a model orpo holds: task names checked up front, then ``simple_evaluate``.

Task names resolve through lm-eval's ``TaskManager`` over its own tasks, then orpo's
(``harness/tasks``: the offline ``ifeval``, which replaces lm-eval's hub-reading one of that name),
then ``include_path`` (whose tasks replace both). lm-eval's index is built once per process and
include path (seconds: it reads every task YAML).
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from orpo.config import ConfigError
from orpo.harness.results import BenchmarkRun, scores_from

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
INSTALL = "pip install 'orpo[eval]'"


def require_lm_eval() -> None:
    """One line naming the extra when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"benchmarks need lm-evaluation-harness: {INSTALL} ({e})") from None


def resolve_tasks(names: Sequence[str], include_path: str | None = None) -> list[str]:
    """``names`` checked against lm-eval's tasks, groups and tags, orpo's and ``include_path``'s;
    an unknown one is a ConfigError naming it and the closest known names. Duplicates go."""
    require_lm_eval()
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ConfigError("no benchmark task named: give lm-eval task names (e.g. --tasks ifeval,arc_easy)")
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" or in --include-path {include_path}" if include_path else ""
            raise ConfigError(f"unknown benchmark task {name!r}: not an lm-eval task, group or tag{where}{hint}")
    return list(dict.fromkeys(names))


def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager over its tasks, orpo's and ``include_path``'s (cached per folder)."""
    require_lm_eval()
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--include-path {include_path}: not a folder of lm-eval task YAMLs")
        include_path = str(folder.resolve())
    return _task_manager(include_path)


@cache
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.tasks._index").addFilter(_OrpoOverride())
    paths = [str(TASKS_DIR), *([include_path] if include_path else [])]
    return TaskManager(include_path=paths)


class _OrpoOverride(logging.Filter):
    """Quiet lm-eval's warning that orpo's ``ifeval`` replaces its own: that is the intent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(TASKS_DIR) in record.getMessage() and "overrides existing task" in record.getMessage())


def run_tasks(model, tokenizer, tasks: Sequence[Any], *, chat_template: str | None, limit: int | float | None,
              include_path: str | None, batch_size: int, max_length: int | None, max_new_tokens: int | None,
              seed: int) -> BenchmarkRun:
    """lm-eval's ``simple_evaluate`` on ``model`` (see the module doc); ``tasks``: names, or a
    ``PairsTask`` (built here for this tokenizer).

    Prompts get ``chat_template`` as training renders it (``None``: the tokenizer's own, else plain
    text); the pairs task is rendered already, so it runs without lm-eval's templating.
    ``max_new_tokens`` caps every generative task's ``max_gen_toks``; ``max_length`` (None: the
    model's) is lm-eval's context limit. Every module's train/eval mode is put back as it was; an
    enclosing ``torch.autocast`` stays in force (lm-eval's own would switch it off). Only the
    process of local rank 0 gets lm-eval's results (``simple_evaluate`` returns None elsewhere):
    the others get a run without scores, having run the same forwards.
    """
    import torch

    from orpo.data.templates import resolve_chat_template
    from orpo.harness.model import OrpoLM
    from orpo.harness.pairs import PairsTask

    require_lm_eval()
    started = time.perf_counter()
    template = resolve_chat_template(chat_template, tokenizer)
    names = [t for t in tasks if isinstance(t, str)]
    built = [t for t in tasks if isinstance(t, PairsTask)]
    manager = task_manager(include_path)
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    try:
        lm = OrpoLM(model, tokenizer, template, batch_size=batch_size, max_length=max_length,
                    mixed_precision_dtype=autocast)
        raws = []
        if names:
            raws.append(_evaluate(lm, manager, names, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
                                  chat=not template.is_plain))
        if built:
            configs = [t.config(lm, template, lm.max_length) for t in built]
            raws.append(_evaluate(lm, manager, configs, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
                                  chat=False))
    finally:
        for m, training in modes.items():
            m.train(training)
    if any(r is None for r in raws):
        return BenchmarkRun(scores=[], raw={}, seconds=time.perf_counter() - started)
    raw = _merge([r for r in raws if r is not None])
    return BenchmarkRun(scores=scores_from(raw), raw=raw, seconds=time.perf_counter() - started)


def _evaluate(lm, manager, specs: list[Any], *, limit, seed: int, max_new_tokens: int | None,
              chat: bool) -> dict[str, Any] | None:
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    tops: list[Any] = []
    for spec in specs:
        loaded = manager.load([spec])
        name = spec if isinstance(spec, str) else spec["task"]
        groups = loaded.get("groups") or {}
        tops.extend([groups[name]] if name in groups else loaded["tasks"].values())
        for task in loaded["tasks"].values():
            gen = task.get_config("generation_kwargs")
            if max_new_tokens is not None and task.get_config("output_type") == "generate_until" and gen:
                gen["max_gen_toks"] = min(int(gen.get("max_gen_toks", max_new_tokens)), max_new_tokens)
    out = simple_evaluate(model=lm, tasks=tops, task_manager=manager, limit=limit, log_samples=False,
                          apply_chat_template=chat, fewshot_as_multiturn=chat, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          bootstrap_iters=100_000)
    if out is None:
        return None
    return json.loads(json.dumps(out, default=handle_non_serializable))


def _merge(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from the templated and the pre-rendered run: per-task tables joined."""
    merged = dict(raws[0])
    for raw in raws[1:]:
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key] = {**merged[key], **value}
            else:
                merged.setdefault(key, value)
    return merged
