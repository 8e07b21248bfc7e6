"""lm-evaluation-harness in orpo: ``orpo benchmark``, ``train.benchmark_tasks`` and offline IFEval.

``resolve_tasks`` checks names before anything loads; ``run_tasks`` runs lm-eval's
``simple_evaluate`` on a model already in memory, prompted with orpo's chat template
(``runner``, ``model``). ``ifeval`` is shipped offline (``tasks/ifeval.yaml``, ``ifeval.py``:
the prompts and a Punkt model built from HH text, ``build_punkt.py``); ``pairs`` turns a preference
file into a two-choice task whose ``acc_per_token`` is ``orpo eval``'s accuracy (``pairs.py``).
Importing this package does not import lm-eval; a missing lm-eval is a ConfigError naming the extra.
"""

from orpo.harness.pairs import PairsTask
from orpo.harness.results import BenchmarkRun, TaskScore
from orpo.harness.runner import resolve_tasks, run_tasks

__all__ = ["BenchmarkRun", "PairsTask", "TaskScore", "resolve_tasks", "run_tasks"]
