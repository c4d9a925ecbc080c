# mlxgate — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make run` serves MODELS (`make model` writes the generated model there);
# serve your own with `make run MODELS=~/.mlx_models`.  DATA is mlxgate's data
# folder for `make run`: with no models it serves the generated test model
# from DATA/test-models, so nothing is written outside the project.
MODELS ?= .models
DATA   ?= .mlxgate-data
# mlx[cpu] on Linux links a reference BLAS; OpenBLAS (Debian libopenblas0-pthread),
# when installed, makes fp32 prefill ~15x and decode ~4x faster (see README, Benchmarks).
OPENBLAS := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0))
FAST_BLAS := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS))

.PHONY: setup run test test-repeat proto model bench bench-scale soak lint readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	MLXGATE_DATA_DIR=$(DATA) $(FAST_BLAS) $(BIN)/mlxgate serve --models-dir $(MODELS)

# Two workers: the suite spends much of its time waiting on the servers and
# subprocesses it starts, so two share this 2-core box well; a module's tests
# stay on one worker (--dist loadscope), so a module's server starts once.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

# The whole suite N times from a clean clone of HEAD, the last BUSY runs beside a CPU-bound
# process: one line per run and the tests that failed (tests/repeat.py).
N    ?= 10
BUSY ?= 0
test-repeat: setup
	$(BIN)/python -m tests.repeat --runs $(N) --busy $(BUSY) --workers $(TEST_WORKERS)

proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/mlxgate/v1/inference.proto

model: setup
	$(BIN)/mlxgate make-test-model $(MODELS)

# Sections, reps and sizes: make bench BENCH_ARGS="--sections engine --reps 5" (see tests/bench/run_bench.py).
BENCH_ARGS ?=
bench: setup
	$(FAST_BLAS) $(BIN)/python -m tests.bench.run_bench $(BENCH_ARGS)

# One front over 1 vs 2 local `mlxgate service` processes (tests/bench/scale.py).
bench-scale: setup
	$(FAST_BLAS) $(BIN)/python -m tests.bench.scale

# An hour of mixed traffic against a running server (not part of `make test`):
# failures and the RSS slope after warm-up.  SOAK_MINUTES=5 for a short one.
SOAK_MINUTES ?= 60
soak: setup
	$(FAST_BLAS) $(BIN)/python -m tests.soak.run_soak --minutes $(SOAK_MINUTES)

lint: setup
	$(BIN)/python -m ruff check mlxgate mlxgate_cli gateway backends tests
	$(BIN)/lint-imports

# README.md's configuration table, from the settings declared in mlxgate/config.py
# (tests/test_settings.py fails while they differ).
readme: setup
	$(BIN)/python -m mlxgate_cli.readme_table README.md

# Only the project's own folders: MODELS or DATA may name a user's folder.
clean:
	rm -rf $(VENV) .models .mlxgate-data build *.egg-info
