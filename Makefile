# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BQEMU  := .venv-bqemu/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean constraints

# The package with every extra and the dev tools, at the versions pinned in constraints.txt
# (pyproject.toml keeps ranges; constraints.txt is what the suite is known to pass with).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	@touch $(STAMP)

$(BQEMU): scripts/bqemu-venv.sh
	bash scripts/bqemu-venv.sh
	@touch $(BQEMU)

install: $(STAMP)

## make demo: generate the DuckDB demo warehouse, start the sandbox APIs on 127.0.0.1,
## run every demo sync, print the summary, stop the sandboxes. Run it twice to see the
## incremental effect.
demo: $(STAMP)
	$(BIN)/reverse-etl demo

## make test: lint (ruff, mypy), then the whole suite (PostgreSQL, fakesnow, bqemulator, moto and the
## sandbox APIs are started by fixtures).
test: $(STAMP) $(BQEMU)
	$(BIN)/ruff check reverse_etl tests
	$(BIN)/ruff format --check reverse_etl tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check reverse_etl tests
	$(BIN)/ruff format --check reverse_etl tests
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format reverse_etl tests
	$(BIN)/ruff check --fix reverse_etl tests

## make bench: what a user gets from `reverse-etl run` (default settings, its own process) at
## 100k, 1M and 10M rows (10M generated once, cached under .reverse_etl/bench/) with the
## share of time per stage at 1M; engine throughput and peak memory at 100k and 1M rows, then each destination
## against its sandbox, unlimited and under the published limits, then the wall-clock figures
## `make test` no longer asserts: sandbox start, body validation, demo generation, pacing in
## real time, PostgreSQL first batch and cancel (figures go in the notes; nothing is asserted).
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python tests/bench/cli_end_to_end.py --sizes 100000,1000000,10000000 --py-spy 1000000 --no-consent
	$(BIN)/python tests/bench/run.py
	PYTHONPATH=. $(BIN)/python tests/bench/sandbox_speed.py
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/bench/source_speed.py
	PYTHONPATH=. $(BIN)/python tests/bench/klaviyo_sandbox.py
	PYTHONPATH=. $(BIN)/python tests/bench/dotdigital_sandbox.py
	PYTHONPATH=. $(BIN)/python tests/bench/consent_readback.py
	PYTHONPATH=. $(BIN)/python tests/bench/snapshot_diff.py
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/bench/shared_budget.py
	PYTHONPATH=. $(BIN)/python tests/bench/cli_end_to_end.py --sizes 100000,1000000

## make constraints: re-pin constraints.txt to what .venv holds now (after changing a
## dependency in pyproject.toml and seeing `make test` pass). Tools installed by hand are left out.
constraints: $(STAMP)
	@{ sed -n '/^#/p' constraints.txt; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(reverse[-_]etl|py-spy|pip|setuptools|wheel)( @|==)'; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf .reverse_etl demo .pytest_cache
