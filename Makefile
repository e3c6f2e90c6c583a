# Set-up and everyday commands. Everything runs inside $(VENV), created on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override e.g. TORCH_SPEC='torch>=2.4' on machines with other wheels.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= examples/demo.yaml
DEMO_CONFIG := examples/demo.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MERGEKIT_VENV ?= .venv-mergekit
BENCH_ARGS ?= --cold
SCALE_ARGS ?=
LINEAR_ARGS ?=

.PHONY: install merge demo test bench mergekit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,hf]'
	$(BIN)/python -c 'from streammerge.kernels import brackets, consensus, dare, fusion, magnitude, magprune, pairwise, philox, ram, sce, stock; brackets.load(); fusion.load(); pairwise.load(); philox.load(); consensus.load(); dare.load(); magnitude.load(); magprune.load(); ram.load(); sce.load(); stock.load()'  # compile once
	touch $@

install: $(STAMP)

demo/model2.pth: scripts/synth.py | $(STAMP)
	$(BIN)/python scripts/synth.py demo demo

demo: demo/model2.pth

merge: $(STAMP)
	@if [ "$(CONFIG)" = "$(DEMO_CONFIG)" ]; then $(MAKE) --no-print-directory demo; fi
	$(BIN)/streammerge merge $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)
	$(BIN)/python scripts/bench_scale.py $(SCALE_ARGS)
	$(BIN)/python scripts/bench_linear.py $(LINEAR_ARGS)

# Optional: mergekit 0.1.5 in a separate venv, for the comparison rows of `make bench`.
mergekit:
	test -x $(MERGEKIT_VENV)/bin/python || $(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(MERGEKIT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check mergekit==0.1.5

clean:
	rm -rf demo merged bench-data .pytest_cache
