# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-test install-docs install-compare demo test docs bench compare clean

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

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

# Optional: the per-sample gradient libraries benchmarks/engine.py and benchmarks/compare.py compare against.
# The constraint keeps the torch already installed; BackPACK without its torchvision pin.
install-compare: install
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt opacus
	$(BIN)/pip install -q --no-deps backpack-for-pytorch einops unfoldNd

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-docs: $(VENV)/.installed-docs

demo: install
	$(BIN)/gradalign demo

# The whole suite; it also builds the documentation site strictly (tests/test_docs.py).
test: install-test
	$(BIN)/python -m pytest

# The documentation site into site/; --strict: a broken link, a missing reference or a warning fails.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

bench: install
	$(BIN)/python -m benchmarks.engine
	$(BIN)/python -m benchmarks.methods

# Per-sample clipping side by side (benchmarks/compare.py); FastDP with COMPARE_ARGS="--fastdp PATH".
compare: install-compare
	$(BIN)/python -m benchmarks.compare $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
