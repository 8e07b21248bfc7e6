"""IFEval offline: the shipped prompts, the shipped Punkt model, and lm-eval's own instruction checks.

lm-eval's IFEval checks import NLTK's ``punkt_tab`` model and download it when it is missing;
``ensure_punkt`` puts orpo's copy (built by ``build_punkt`` from HH-RLHF text, not NLTK's official
model) first on ``nltk.data.path``, so nothing is fetched. Call it before any
``lm_eval.tasks.ifeval`` import; every function here does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NLTK_DATA = HERE / "nltk_data"
PROMPTS = HERE / "data" / "ifeval" / "input_data.jsonl"


def ensure_punkt() -> None:
    """Make the shipped ``punkt_tab`` the one NLTK finds (idempotent)."""
    import nltk

    path = str(NLTK_DATA)
    if not nltk.data.path or nltk.data.path[0] != path:
        if path in nltk.data.path:
            nltk.data.path.remove(path)
        nltk.data.path.insert(0, path)


@dataclass(frozen=True)
class IfevalCheck:
    """lm-eval's verdicts for one response, one per instruction of the row, in its order."""

    strict: list[bool]
    loose: list[bool]

    @property
    def strict_score(self) -> float:
        """Fraction of the instructions followed, strictly (0..1; 0 for a row without instructions)."""
        return sum(self.strict) / len(self.strict) if self.strict else 0.0

    @property
    def loose_score(self) -> float:
        return sum(self.loose) / len(self.loose) if self.loose else 0.0


def check_ifeval(row: dict[str, Any], response: str) -> IfevalCheck:
    """Score ``response`` against an IFEval-format row (``prompt``, ``instruction_id_list``, ``kwargs``).

    lm-eval's ``test_instruction_following_strict`` / ``_loose``: the same checks ``orpo benchmark
    --tasks ifeval`` scores with. A row naming an unknown instruction raises ``DataError``.
    """
    from orpo.data import DataError

    utils = _ifeval_utils()
    ids = list(row.get("instruction_id_list") or [])
    kwargs = list(row.get("kwargs") or [{} for _ in ids])
    if len(kwargs) != len(ids):
        raise DataError(f"IFEval row {row.get('key', '?')}: {len(ids)} instruction_id_list entries but "
                        f"{len(kwargs)} kwargs")
    unknown = [i for i in ids if i not in _registry()]
    if unknown:
        raise DataError(f"IFEval row {row.get('key', '?')}: instruction_id_list: unknown instruction {unknown[0]!r}")
    inp = utils.InputExample(key=row.get("key", 0), instruction_id_list=ids, prompt=row.get("prompt", ""),
                             kwargs=kwargs)
    strict = utils.test_instruction_following_strict(inp, response)
    loose = utils.test_instruction_following_loose(inp, response)
    return IfevalCheck(strict=list(strict.follow_instruction_list), loose=list(loose.follow_instruction_list))


@cache
def read_prompts() -> tuple[dict[str, Any], ...]:
    """The 541 shipped IFEval rows (google-research's ``input_data.jsonl``, byte for byte)."""
    with open(PROMPTS, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _ifeval_utils():
    ensure_punkt()
    from lm_eval.tasks.ifeval import utils

    return utils


def _registry() -> dict[str, Any]:
    ensure_punkt()
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry.INSTRUCTION_DICT
