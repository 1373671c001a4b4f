# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Torch first, from a local wheel when the machine has one (pip's find-links):
# `--no-index` never touches the registry, so no CUDA build is pulled here.
# Elsewhere that step finds nothing and the ordinary `pip install` below gets torch.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null || true
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/gradalign demo

test: install-test
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/methods.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
