# Two commands for a newcomer: `make run` (install, then answer a question with the default
# model) and `make test` (install with test extras, then run the test suite; CI runs this).
# `make test-slow` runs the tests marked `slow` (end-to-end checks of a minute or more) that
# `make test` leaves out to keep CI within its time.
PYTHON ?= python3
VENV ?= .venv
# CPU build from the local wheel cache on CPU-only machines; on a GPU machine set TORCH_SPEC to
# the torch you already use (e.g. TORCH_SPEC=torch) or install pagedllm into that environment.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: install run test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/pagedllm generate "$(PROMPT)"

test: install
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow --durations=15

clean:
	rm -rf $(VENV) build *.egg-info
