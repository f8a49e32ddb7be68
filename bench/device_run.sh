#!/usr/bin/env bash
# The one script a session with a lent GPU machine runs (the `device` tool): the full-size GPU
# benchmark and a short CUDA training run, results under $OUT/results (then commit them into
# bench/results/, marked with the device). Needs torch with CUDA on that machine; no services.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT/results"
cp bench/results/gpu.json "$OUT/results/" 2>/dev/null || true   # merge: runs.cpu stays, runs.cuda is added
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/results/device.txt"
PYTHONPATH=. timeout 420 python3 bench/gpu.py --device cuda --out "$OUT/results"
PYTHONPATH=. timeout 150 python3 bench/cuda_check.py --out "$OUT/results"
