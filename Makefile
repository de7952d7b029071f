# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/stdlib

.PHONY: venv data train test lint bench bench-goodput gpu-check

# The venv is (re)installed only when missing or when pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,trackers]'
	touch $(STAMP)

venv: $(STAMP)

# The MLflow tracking server the tracker tests run, in a venv of its own, as users run it: the full
# mlflow package pulls scipy, scikit-learn and matplotlib, which torchmetrics then imports in every
# trainer process (3 s each). SQLAlchemy 2.1 breaks MLflow 2.x's store.
MLFLOW_SERVER := .venv-mlflow/.installed
$(MLFLOW_SERVER): Makefile
	test -x .venv-mlflow/bin/python || $(PYTHON) -m venv .venv-mlflow
	.venv-mlflow/bin/pip install --quiet 'mlflow>=2.14.1,<3' 'sqlalchemy<2.1'
	touch $(MLFLOW_SERVER)

# The default dataset: the Python standard library's own sources, byte-tokenized.
$(DATA)/train/index.json: | $(STAMP)
	$(BIN)/python -m prefix.data $(DATA) --overwrite \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"/*.py

data: $(DATA)/train/index.json

train: venv data
	$(BIN)/composer -m prefix.train yamls/base.yaml

# Two workers; tests sharing an expensive fixture stay on one worker (tests/conftest.py).
test: venv $(MLFLOW_SERVER)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup --durations=15

lint: venv
	$(BIN)/ruff check prefix tests benchmarks
	$(BIN)/shellcheck runai/*.sh .ci/run benchmarks/gpu_wheels.sh

# Checkpoint cost and resume time, then prefix against plain Composer (benchmarks/README.md); not part of the tests.
bench: venv data
	$(BIN)/python benchmarks/checkpoint_bench.py --data $(DATA)
	$(BIN)/python benchmarks/goodput_bench.py

# prefix against plain Composer with autoresume: throughput, start-up part by part, goodput under a preemption trace.
bench-goodput: venv data
	$(BIN)/python benchmarks/goodput_bench.py

# The CUDA paths on a machine with one GPU, at most 8 minutes (benchmarks/gpu_check.py); not part of the tests.
# No .venv: the GPU host's own Python, with the wheels of benchmarks/gpu_wheels.sh on PYTHONPATH (benchmarks/README.md).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out gpu-check-out
