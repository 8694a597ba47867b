# make run: set up and serve the modules/ folder on 127.0.0.1:8000 (auth off, local state).
# make test: set up and run lint, types and the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Serving needs the package only; testing adds its tools (moto, mypy, ruff, ...).
RUN_STAMP  := $(VENV)/.run-stamp
TEST_STAMP := $(VENV)/.test-stamp

.PHONY: run test lint bench clean settings-table

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(RUN_STAMP) $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/python -m tfserver

lint: $(TEST_STAMP)
	$(BIN)/ruff check tfserver tests bench
	$(BIN)/mypy tfserver

# The suite's files run in parallel (each file's tests in one worker: their servers are
# module fixtures); most of the time is spent waiting on terraform and sockets.
JOBS ?= 3

test: lint
	$(BIN)/pytest -n $(JOBS) --dist loadfile

bench: $(TEST_STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_auth.py
	$(BIN)/python bench/bench_s3.py
	$(BIN)/python bench/bench_runs.py
	$(BIN)/python bench/bench_ops.py
	$(BIN)/python bench/bench_reads.py
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_drift.py
	$(BIN)/python bench/bench_refs.py
	$(BIN)/python bench/bench_upgrades.py

# Rewrite docs/configuration.md's table of settings from the one table in tfserver/settings.py.
settings-table: $(RUN_STAMP)
	$(BIN)/python -c 'import re, pathlib; from tfserver.settings import markdown_table; \
	p = pathlib.Path("docs/configuration.md"); t = p.read_text(); \
	p.write_text(re.sub(r"(?s)<!-- settings -->.*?<!-- /settings -->", \
	"<!-- settings -->\n" + markdown_table() + "\n<!-- /settings -->", t))'

clean:
	rm -rf $(VENV) .tfserver .pytest_cache .mypy_cache .ruff_cache *.egg-info
