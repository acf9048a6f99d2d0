#!/usr/bin/env bash
# GPU check for one CUDA machine (an H200 here) that has torch, numpy, Pillow, pyarrow and pytest but no network
# and no Ray, MLflow or constriction. About seven minutes on an H200.
#   bash bench/gpu_wheels.sh     # once, where PyPI is reachable: constriction's wheel into .whl/ (git-ignored)
#   bash bench/gpu_check.sh      # there; with the device tool: carry [".whl"]
# Runs the CUDA smoke tests and the device tests, then prints three tables: fitting throughput at 256 px for B up
# to 256 (fp32, then TF32 matmuls), peak memory against the memory model, and the compact preset's joint phase.
# Writes JSON lines under $OUT (default /tmp/mrnet_gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mrnet_gpu}"
mkdir -p "$OUT"
if ! python3 -c "import constriction" 2>/dev/null; then
    [ -n "$(ls .whl/*.whl 2>/dev/null)" ] || { echo "no constriction here and no .whl/: run bench/gpu_wheels.sh first"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mrnet_site .whl/*.whl
    export PYTHONPATH="/tmp/mrnet_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# -p no:cacheprovider: the checkout may be read-only; the Ray tests are not collected (no Ray here).
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py 2>&1 | tee "$OUT/tests.txt" \
    || echo "gpu_check: TESTS FAILED (see above); the benchmarks still run"
python3 bench/fit_throughput.py --device cuda --sizes 256 --batches 1,16,64,256 --json "$OUT/fit_fp32.jsonl"
echo '{"tf32": true}' > /tmp/mrnet_tf32.json
python3 bench/fit_throughput.py --device cuda --sizes 256 --batches 64,256 --config /tmp/mrnet_tf32.json \
    --json "$OUT/fit_tf32.jsonl"
python3 bench/joint_phase.py --device cuda --batches 1,16,64,256 --fit --json "$OUT/joint.jsonl"
