# Two commands do all set-up on a fresh machine:
#   make demo   - install, resolve the JVM jars, start the stack and run the platform end to end
#   make test   - install, resolve the JVM jars, run the static checks (make lint) and the whole test suite
# Both are idempotent: a second run reuses the virtualenv and the jars.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup browser demo lint test stop status clean help

help:
	@echo "make demo    run the platform end to end on the embedded stack (left running)"
	@echo "make test    run make lint, then the test suite (starts and stops its own stack)"
	@echo "make lint    static checks: ruff (rules in pyproject.toml) and mypy (strict on the files it lists)"
	@echo "make stop    stop the demo's stack (service, speed layer, MLflow, Kafka) and a service started by hand here"
	@echo "make status  show what is running"

# The demo's environment: the platform and the notebooks' Jupyter. `make test` adds the test
# tools (pytest, linters, Playwright...) on top, in the same virtualenv.
$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "java not found: install OpenJDK 17 (apt-get install openjdk-17-jdk-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn not found: install Maven (apt-get install maven)"; exit 1; }
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "Python 3.11 is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
# The layers are top-level packages by design: setuptools' advice about such (flat) layouts in
# editable installs is left out of the output.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e ".[notebooks]"
	@touch $@

$(TEST_STAMP): $(STAMP)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e ".[test]"
# MovieLens 100k for bench/real_data.py and its test: the package's data files only.
	$(PY) -m pip install --quiet --no-deps "recbole==1.2.1"
	@touch $@

setup: $(STAMP)
	$(VENV)/bin/lambda-ml setup

# Debian's chromium for tests/test_browser.py, installed by `make test` (the demo needs none).
# Playwright drives it; no browser is downloaded from anywhere else. As root it is installed with
# apt-get; otherwise the command is printed and the browser tests fail saying so.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "chromium not found: the browser tests (tests/test_browser.py) need it; run: sudo apt-get install -y chromium"; \
	fi

demo: setup
	$(VENV)/bin/lambda-ml demo

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# pytest's own exit code fails the target, 5 (no test collected) included. The tests run in
# PYTEST_WORKERS processes (pytest-xdist), each with its own broker, MLflow server and Spark
# session (the session fixtures); a file's tests stay in one worker, so that its module fixtures
# are built once. PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2

test: setup browser lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

stop:
	$(VENV)/bin/lambda-ml stack down

status:
	$(VENV)/bin/lambda-ml stack status

clean: stop
	rm -rf .data
