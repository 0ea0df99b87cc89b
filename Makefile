# Every target builds .venv from this project's own files; nothing is downloaded at run time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# -qq: a few packages ship files that are not meant to compile (pip skips them silently too).
COMPILE := $(PY) -m compileall -qq -j 0 $(VENV)/lib || true

.PHONY: demo test lint format audit bench-venv clean

# One pip call a target (one dependency resolution). pip byte-compiles what it installs on one
# core; compileall does it on all of them (a fresh `make test` venv: see the README's table).
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile torch==2.13.0 -e '.[all]'
	$(COMPILE)
	touch $@

# Builds .base's packages too when it is missing, in the same single pip call.
$(VENV)/.test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile torch==2.13.0 -e '.[all,test]'
	$(COMPILE)
	touch $(VENV)/.base $@

demo: $(VENV)/.base
	$(VENV)/bin/cnnkit demo

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -m "not slow and not gpu" -q -n auto --dist loadfile

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
