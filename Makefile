# Every target builds .venv from this project's own files; nothing is downloaded at run time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Python writes a module's bytecode (.pyc) the first time something imports it: only the
# modules cnnkit and its tests use (about 3,800 of the venv's 12,000) are ever compiled, where
# compiling all of them up front took 72 s on this 2-core machine. A shell that sets
# PYTHONDONTWRITEBYTECODE would instead have every command compile its imports again (torch's
# import twice as slow), so the commands below run with it empty, which Python reads as unset:
# the bytecode goes into .venv, and into src/ and tests/ as __pycache__ folders (git ignores
# them). A plain shell assignment, so any make runs it.
WRITE_PYC := PYTHONDONTWRITEBYTECODE=

.PHONY: demo test lint format audit bench-venv clean

# One pip call a target (one dependency resolution), without pip's byte-compiling of every
# file it installs (on one core; see above). A fresh `make test` venv: the README's table.
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile torch==2.13.0 -e '.[all]'
	touch $@

# Builds .base's packages too when it is missing, in the same single pip call.
$(VENV)/.test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile torch==2.13.0 -e '.[all,test]'
	touch $(VENV)/.base $@

demo: $(VENV)/.base
	$(WRITE_PYC) $(VENV)/bin/cnnkit demo

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(WRITE_PYC) $(PY) -m pytest -m "not slow and not gpu" -q -n auto --dist loadfile

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.test
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

audit: $(VENV)/.test
	$(PIP) pip-audit
	$(VENV)/bin/pip-audit --skip-editable --progress-spinner off

bench-venv:
	test -x .bench-venv/bin/python || $(PYTHON) -m venv .bench-venv
	.bench-venv/bin/python -m pip install --quiet --disable-pip-version-check \
		-r benchmarks/requirements-keras.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
