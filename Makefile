# The two set-up commands of the README: `make demo` (install + run the whole pipeline on the built-in default)
# and `make test` (install + run the test suite). Everything else here is a helper for those two.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint browser-deps postgres-deps

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this picks the CPU wheel on machines that have it instead of a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/llm-pipeline run --config configs/tiny.yaml

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser tests need Debian's chromium: sudo apt-get install chromium"; exit 1; fi; }

# PostgreSQL server binaries for tests/test_store_postgres.py (which also installs them itself when run alone)
postgres-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends postgresql >/dev/null; \
	  else echo "the PostgreSQL test needs Debian's postgresql: sudo apt-get install postgresql"; fi; }

test: install browser-deps postgres-deps
	$(BIN)/pytest --durations=30

test-fast: install
	$(BIN)/pytest -m "not slow and not browser"

lint: install
	$(BIN)/ruff check llm stages flows bench tests
