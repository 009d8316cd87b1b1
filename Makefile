# Two commands do all the set-up on a fresh machine:
#   make demo   builds .venv (first time only) and runs the end-to-end toy demo
#   make test   builds .venv (first time only) and runs the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo

.PHONY: demo test test-all setup clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipes demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)
