# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so that pip takes the CPU wheel this machine keeps on disk;
# users elsewhere get whatever torch>=2.3 their platform offers.
TORCH ?= torch==2.13.0
DEMO_DATA ?= data/demo

.PHONY: install demo test lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(DEMO_DATA)/truth.json: | install
	$(BIN)/cae synth --out $(DEMO_DATA)

demo: install $(DEMO_DATA)/truth.json
	$(BIN)/cae train --config experiments/demo.toml --out runs/demo --overwrite

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs $(DEMO_DATA) .pytest_cache
