# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench faults setup clean docs

setup: $(STAMP)

# torch is installed first and pinned: on these machines `torch==2.13.0` is a local CPU wheel, while
# an unpinned torch pulled in by another package would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/orpo train examples/quickstart.yaml train.overwrite=true

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples $(wildcard bench)
	$(VENV)/bin/mypy src/orpo

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

docs: $(STAMP)
	$(VENV)/bin/orpo config-doc > docs/configuration.md

bench: $(STAMP)
	$(PY) bench/run.py

# The fault suite (docs/reliability.md): 20 SIGKILLs, 3 SIGTERMs, 2 damaged checkpoints and a full disk
# on stories260K + HH, each followed by a resume; the final weights must equal an uninterrupted run's.
# Several minutes on 2 cores; writes runs/faults/faults.json. A short variant runs in `make test`.
faults: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tests/faults/run.py --out runs/faults

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
