# Every target builds .venv from this project's own files; nothing is downloaded at run time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint format audit bench-venv clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[all]'
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[all,test]'
	touch $@

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
