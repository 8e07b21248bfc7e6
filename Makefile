# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-scaling faults setup clean docs test-compat

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

# How a step's time and memory grow with max_length and the vocabulary (orpo vs TRL, under a memory cap),
# and orpo preprocess with the dataset's size: bench/results/scaling.{json,png}; ~25 min on 2 quiet cores.
bench-scaling: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/scaling.py

# The fault suite (docs/reliability.md): 20 SIGKILLs, 3 SIGTERMs, 2 damaged checkpoints and a full disk
# on stories260K + HH, each followed by a resume; the final weights must equal an uninterrupted run's.
# Several minutes on 2 cores; writes runs/faults/faults.json. A short variant runs in `make test`.
faults: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tests/faults/run.py --out runs/faults

# Compatibility venv with the GPU image's library versions: transformers 5.17, accelerate 1.15, peft 0.21.
# torch stays at 2.13.0 (local CPU wheel): PyPI's torch 2.11.0 Linux x86_64 wheel (531 MB) is a CUDA build
# and with --no-deps fails to import on a CPU machine ("libcudnn.so.9: cannot open shared object file");
# its nvidia-*/cuda-toolkit/triton dependencies add several GB. download.pytorch.org is not reachable.
COMPAT       := .venv-compat
COMPAT_PY    := $(COMPAT)/bin/python
COMPAT_STAMP := $(COMPAT)/.installed
COMPAT_PINS  := "torch==2.13.0" "transformers==5.17.0" "accelerate==1.15.0" "peft==0.21.2"
COMPAT_TESTS := $(wildcard tests/test_distributed.py tests/test_distributed_config.py tests/test_train_ddp.py \
	tests/test_layouts.py tests/test_chunked_logps.py tests/test_objectives.py tests/test_objectives_run.py \
	tests/test_checkpoint.py tests/test_engine_gpu_ready.py tests/test_chunked_engines.py \
	tests/test_layout_windows.py tests/test_loss.py tests/test_host_syncs.py tests/test_sharded_eval.py \
	tests/test_disable_dropout.py)

$(COMPAT_STAMP): pyproject.toml Makefile
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet $(COMPAT_PINS)
	$(COMPAT_PY) -m pip install --quiet -e ".[dev]" $(COMPAT_PINS)
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c "import torch, transformers, accelerate, peft; print('compat:', torch.__version__, transformers.__version__, accelerate.__version__, peft.__version__)"
	HF_HUB_OFFLINE=1 $(COMPAT)/bin/pytest -q $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) $(COMPAT) runs .pytest_cache .ruff_cache .mypy_cache
