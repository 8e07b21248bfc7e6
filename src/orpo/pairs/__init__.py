"""``orpo pairs``: preference pairs built from demonstrations (SFT data) and a model's own samples.

demos.py     the demonstrations: prompt/response, instruction/output, messages ending in an
             assistant turn, or a preference file's prompt + chosen; bad rows named
sampling.py  per-sample seeded generation (a local model, batched; or an OpenAI-compatible server)
scorers.py   what ranks samples: a reward model, the IFEval checks
progress.py  the progress file beside --out: what a killed run has done, checked against its arguments
build.py     the strategies, one source row at a time, and the summary
command.py   the command line
"""

# here, not in build.py: the command line lists them without importing torch
STRATEGIES = ("reference-vs-sample", "best-vs-worst", "judge-pairwise")
