# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PKGS := jobs worker web devstack migrations tests bench

.PHONY: install lint format test test-unit faults soak demo up bench clean stop

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check $(PKGS)
	$(BIN)/ruff format --check $(PKGS)
	$(BIN)/mypy

format: install
	$(BIN)/ruff format $(PKGS)
	$(BIN)/ruff check --fix $(PKGS)

test: lint
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

# The fault suite alone, printing each fault's recovery figures.
faults: install
	$(BIN)/pytest -s -m faults tests/faults

# The fault suite five times in a row: rare races show up here, not in one run.
soak: install
	for i in 1 2 3 4 5; do $(BIN)/pytest -q -m faults tests/faults || exit 1; done

demo: install
	$(BIN)/python -m devstack demo

# Like `heroku local`: migrate, then the Procfile's worker and beat under honcho,
# on the embedded defaults (Ctrl-C stops them; `make stop` stops the servers).
up: install
	$(BIN)/python -m devstack up

# Measures the whole stack against the strict simulator and writes BENCHMARKS.md
# (about an hour on a 2-core machine; QUICK=1: limits x10, latencies /10; ONLY="rpm priority").
bench: install
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(if $(ONLY),--only $(ONLY))

# Stops the embedded PostgreSQL, Redis and simulator under var/ if they are running.
stop: install
	$(BIN)/python -m devstack stop

clean: stop
	rm -rf var
