"""The functions orpo's offline ``ifeval`` task (ifeval.yaml beside this file) names.

The prompts come from the copy shipped in orpo, loaded as a local JSON file (never the hub); the
scoring is lm-eval's own ``lm_eval.tasks.ifeval.utils``, with orpo's Punkt model put first on
NLTK's path so its sentence counts need no download.
"""

from __future__ import annotations

from typing import Any

from orpo.harness.ifeval import PROMPTS, ensure_punkt


def load_prompts(**metadata: Any):
    """``{"train": the 541 rows}``: the shipped input_data.jsonl through datasets' local json builder."""
    import datasets

    return datasets.load_dataset("json", data_files={"train": str(PROMPTS)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    ensure_punkt()
    from lm_eval.tasks.ifeval import utils

    return utils.process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    from lm_eval.tasks.ifeval import utils

    return utils.agg_inst_level_acc(items)
