# make run   - set up .venv if needed, then run the worker (starting an embedded Temporal
#              dev server with the Web UI on http://localhost:8233 if nothing listens at
#              TEMPORAL_ADDRESS)
# make test  - set up .venv and node_modules if needed, lint, then the whole test suite
#              (real dev server)
# make test-quick - lint, then the tests not marked `slow`: the quick loop (about 110 s
#              of CPU: 1-2 minutes on two idle cores)
# make lock  - regenerate requirements.txt and requirements-dev.txt (every package pinned,
#              with hashes) from requirements.in and requirements-dev.in
# make node  - install pm2 from package-lock.json into node_modules (npm ci)
# make lint  - ruff, mypy (strict on the service; see pyproject.toml), and the workflow
#              determinism check (python -m tools.check_workflows)

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Touched after a successful install: requirements changes re-install, nothing else does.
# --no-deps: the lock already names every package; pip's own resolver (23.x, as a new venv
# has it) would otherwise pick the newest release for a dependency asked for with extras
# (fastmcp-slim[client,server], pydantic[email]) instead of the pinned one, and refuse.
STAMP := $(VENV)/.requirements-installed
NODE_STAMP := node_modules/.installed
# The lock is made for the platform the worker and CI run on; pins already in the .txt
# files are kept unless asked otherwise (make lock LOCK_ARGS=--upgrade, or
# LOCK_ARGS='--upgrade-package temporalio').
LOCK_ARGS ?=
LOCK := $(VENV)/bin/uv pip compile --quiet --generate-hashes --only-binary :all: \
	--python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--custom-compile-command 'make lock' $(LOCK_ARGS)

.PHONY: venv node lock run test test-quick lint bench demo clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 is required, $(PYTHON) is " + sys.version.split()[0] + " (try: make PYTHON=python3.12)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps --only-binary :all: -r requirements-dev.txt
	touch $(STAMP)

node: $(NODE_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

lock: venv
	$(LOCK) requirements.in -o requirements.txt
	$(LOCK) requirements-dev.in -o requirements-dev.txt

run: venv
	$(PY) -m tools.run

# mypy's settings and the files it checks: pyproject.toml [tool.mypy]. Its cache
# (.mypy_cache, git-ignored) makes a second run take about a second instead of about 12.
# tools.check_workflows refuses non-deterministic calls in workflows/ (the sandbox is off).
lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m tools.check_workflows

# Four pytest processes on two cores: most tests wait on real servers and processes, so
# the others use the time one spends waiting (worksteal evens out the long tests).
# Measured on this machine kind: the whole suite 570 s with -n 2, 441 s with -n 4.
test: lint node
	$(PY) -m pytest -p no:cacheprovider --timeout=600 -n 4 --dist worksteal

# The quick loop: what takes 5 s or more (a real worker process, a pipeline played by
# agent processes, Synapse, pm2) is marked `slow`; `make test` still runs it all.
test-quick: lint
	$(PY) -m pytest -p no:cacheprovider --timeout=600 -n 4 --dist worksteal -m 'not slow'

bench: venv
	$(PY) bench/pipeline_bench.py

demo: venv
	$(PY) -m tools.demo

clean:
	rm -rf $(VENV) node_modules .ruff_cache .mypy_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
