#!/usr/bin/env bash
# GPU check for one CUDA machine (an H200 here) that has torch, numpy, Pillow, pyarrow and pytest but no network
# and no Ray, MLflow or constriction. About six minutes on an H200; each step has its own time limit, so a slow
# one cannot take the rest with it.
#   bash bench/gpu_wheels.sh     # once, where PyPI is reachable: constriction's wheel into .whl/ (git-ignored)
#   bash bench/gpu_check.sh      # there; with the device tool: carry [".whl"]
# Runs the CUDA smoke tests and the device tests, then the product's rate-controlled encodes at 256 px and 0.5 bpp
# (M-Nets from the shipped prior, latent pyramids) in images/hour, and the latent pyramid's step time against the
# batch. Writes logs and JSON lines under $OUT (default /tmp/mrnet_gpu). The fitting-engine tables of earlier
# plans (bench/fit_throughput.py, bench/joint_phase.py) take --device cuda too; they are not run here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mrnet_gpu}"
mkdir -p "$OUT"
if ! python3 -c "import constriction" 2>/dev/null; then
    [ -n "$(ls .whl/*.whl 2>/dev/null)" ] || { echo "no constriction here and no .whl/: run bench/gpu_wheels.sh first"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mrnet_site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/mrnet_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
failed=0
step() {  # step SECONDS NAME COMMAND...: run it, its output to the screen and $OUT/NAME.txt, within SECONDS
    local seconds=$1 name=$2; shift 2
    echo "== $name (at most ${seconds}s)"
    timeout -k 10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "gpu_check: $name ended with status $rc (124: out of time)"; failed=1; }
}
# -p no:cacheprovider: the checkout may be read-only; the Ray tests are not collected (no Ray here).
step 120 tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py
step 60 latent_step python3 bench/latent_step.py --device cuda --sizes 256 --batches 16,64,256 --steps 20
step 150 encode_m python3 bench/gpu_encode.py --model m --batches 256 --json "$OUT/encode.jsonl"
step 180 encode_g python3 bench/gpu_encode.py --model g --batches 16 --json "$OUT/encode.jsonl"
echo "== summary"
grep -h "^|" "$OUT"/latent_step.txt "$OUT"/encode_m.txt "$OUT"/encode_g.txt 2>/dev/null
tail -n 3 "$OUT/tests.txt"
exit $failed
