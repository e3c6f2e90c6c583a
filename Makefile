# Set-up and everyday commands. Everything runs inside $(VENV), created on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override e.g. TORCH_SPEC='torch>=2.4' on machines with other wheels.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= examples/demo.yaml
DEMO_CONFIG := examples/demo.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install merge demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
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
	$(BIN)/python scripts/bench.py

clean:
	rm -rf demo merged bench-data .pytest_cache
