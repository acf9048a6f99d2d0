# `make demo` and `make test` each set up .venv first (once, and again when pyproject.toml changes).
PY := .venv/bin/python

.venv/.stamp: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# A CUDA build of torch where there is a GPU; the small CPU build otherwise.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: .venv/.stamp

demo: .venv/.stamp
	.venv/bin/mrnet encode samples --out out/demo --size 256

test: .venv/.stamp
	$(PY) -m pytest tests

lint: .venv/.stamp
	$(PY) -m ruff check .

.PHONY: setup demo test lint
