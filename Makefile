# `make demo` and `make test` each set up .venv first (once, and again when pyproject.toml changes).
PY := .venv/bin/python
# The torch build, chosen here and overridable: `make TORCH=torch` (PyPI's default: a CUDA build on Linux),
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` (PyTorch's CPU wheels, small on any machine). By default
# a CUDA build where nvidia-smi is present, and torch==2.13.0 otherwise (a CPU build from this project's machines'
# package cache; on an ordinary machine with PyPI alone, add TORCH_INDEX as above for a small CPU build).
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
TORCH_INDEX ?=

.venv/.stamp: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: .venv/.stamp

demo: .venv/.stamp
	.venv/bin/mrnet encode samples --out out/demo --size 256 --target-bpp 0.5

test: .venv/.stamp
	$(PY) -m pytest tests

lint: .venv/.stamp
	$(PY) -m ruff check .

.PHONY: setup demo test lint
