#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a GPU machine that has torch, numpy, Pillow, pyarrow and pytest but no
# network: constriction (model files), for the GPU machine's Python (3.12 by default) on x86-64 Linux. Run here,
# where PyPI is reachable; the wheels land in .whl/ (git-ignored), which the check installs from.
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
# The requirement as pyproject.toml states it (its minor version fixes the bits of model files).
spec=$(python3 -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('constriction')))")
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${1:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
ls -l .whl
