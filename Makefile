# make run: set up and serve the modules/ folder on 127.0.0.1:8000 (auth off, local state).
# make test: set up and run lint, types and the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean settings-table

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tfserver

lint: $(STAMP)
	$(BIN)/ruff check tfserver tests bench
	$(BIN)/mypy tfserver

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_auth.py
	$(BIN)/python bench/bench_s3.py

# Rewrite README's table of settings from the one table in tfserver/config.py.
settings-table: $(STAMP)
	$(BIN)/python -c 'import re, pathlib; from tfserver.config import markdown_table; \
	p = pathlib.Path("README.md"); t = p.read_text(); \
	p.write_text(re.sub(r"(?s)<!-- settings -->.*?<!-- /settings -->", \
	"<!-- settings -->\n" + markdown_table() + "\n<!-- /settings -->", t))'

clean:
	rm -rf $(VENV) .tfserver .pytest_cache .mypy_cache .ruff_cache *.egg-info
