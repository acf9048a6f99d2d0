#!/usr/bin/env bash
# GPU check for one H200 (torch, numpy and Pillow installed; no network). About five minutes:
#   bash bench/gpu_check.sh
# Prints the throughput table for 256 px RGB at growing batches, in fp32 and with TF32 matmuls.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 bench/fit_throughput.py --device cuda --sizes 256 --batches 1,16,64,256 --json "${OUT:-.}/gpu_fp32.jsonl"
echo '{"tf32": true}' > /tmp/mrnet_tf32.json
python3 bench/fit_throughput.py --device cuda --sizes 128,256 --batches 64,256 --config /tmp/mrnet_tf32.json \
    --json "${OUT:-.}/gpu_tf32.jsonl"
