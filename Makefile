# make run   - set up .venv if needed, then run the worker (starting an embedded Temporal
#              dev server with the Web UI on http://localhost:8233 if nothing listens at
#              TEMPORAL_ADDRESS)
# make test  - set up .venv if needed, lint, then the whole test suite (real dev server)

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Touched after a successful install: requirements changes re-install, nothing else does.
STAMP := $(VENV)/.requirements-installed

.PHONY: venv run test lint bench demo clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 is required, $(PYTHON) is " + sys.version.split()[0] + " (try: make PYTHON=python3.12)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: venv
	$(PY) -m tools.run

lint: venv
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -p no:cacheprovider --timeout=600

bench: venv
	$(PY) bench/pipeline_bench.py

demo: venv
	$(PY) -m tools.demo

clean:
	rm -rf $(VENV) .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
