# The README's two commands: `make run` (main job, embedded default) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test lint smoke serve stop
install: $(VENV)/.installed

# `make run`: `dvc repro` of the embedded default (params.yaml) in the checkout, stale stages
# only, then the summary table. PROFILE=smoke|full runs that profile in runs/<profile>/.
PROFILE ?= default
run: install
	@export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; set -e; \
	ws=$$($(PY) -m flows.workspace $(PROFILE)); cd "$$ws"; \
	echo "== dvc repro in $$ws (profile $(PROFILE))"; \
	dvc repro; \
	python -m tasks.report --show

smoke:
	$(MAKE) run PROFILE=smoke

# Background Prefect server + worker + MLflow UI (state inside the checkout); `make stop` ends them.
serve: install
	scripts/serve.sh

stop:
	scripts/stop.sh

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
