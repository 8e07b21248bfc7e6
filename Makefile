# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench setup clean docs

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
