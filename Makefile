# The two set-up commands of the README:
#   make demo   installs everything (first time) and runs the default private simulation
#   make test   installs everything (first time) and runs the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install data test-tools demo test bench lint

install: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

data:
	@bash scripts/install-data.sh

test-tools:
	@bash scripts/install-test-tools.sh

demo: install
	$(VENV)/bin/dpfl simulate

test: install test-tools
	$(VENV)/bin/ruff check common client server simulations tests
	$(VENV)/bin/mypy common client server simulations
	$(PY) -m pytest
	DPFL_REQUIRE_CONTAINERS=$$(bash scripts/install-test-tools.sh --required) $(PY) -m pytest -m slow

bench: install
	$(VENV)/bin/dpfl bench --round

lint: install
	$(VENV)/bin/ruff check common client server simulations tests
	$(VENV)/bin/mypy common client server simulations
