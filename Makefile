# mlxgate — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODELS ?= .models

.PHONY: setup run test proto model bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/mlxgate serve

test: setup
	$(BIN)/python -m pytest -q tests

proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/mlxgate/v1/inference.proto

model: setup
	$(BIN)/mlxgate make-test-model $(MODELS)

bench: setup
	$(BIN)/python -m tests.bench.run_bench

lint: setup
	$(BIN)/python -m ruff check mlxgate gateway backends tests

clean:
	rm -rf $(VENV) $(MODELS) build *.egg-info
