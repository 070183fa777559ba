#!/usr/bin/env bash
# The checks that need a CUDA machine: the whole test suite (GPU tests included) and the
# extractor benchmark on the GPU. Writes logs into $1 (default ./gpu-results).
# Expects the project set up (scripts/setup.sh), or an environment with torch in which
# PYTHONPATH already holds the other dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -15
for batch in 32 256; do
  python3 bench/extractor_bench.py --device cuda --batch "$batch" --batches 10 --rounds 3 \
    --clients 64 --seconds 8 2>&1 | tee "$out/bench_b$batch.log" | tail -5
done
