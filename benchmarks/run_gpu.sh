#!/usr/bin/env bash
# One command for a lent GPU machine (its own torch/triton/transformers are preinstalled):
# the GPU benchmark first (its numbers are what the GPU is for), then the Triton tests compiled for real.
# Results land in $OUT (gpu_benchmark.json, logs). Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [bench-seconds]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD SFTINT_SKIP_EXT=1 OUT
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${1:-330}" python -m pytest benchmarks/test_gpu.py -s -q -p no:cacheprovider -k "not tf32" 2>&1 | tail -60 > "$OUT/bench.log"
tail -25 "$OUT/bench.log"
timeout "${2:-150}" python -m pytest -q -x -p no:cacheprovider tests/test_triton_transforms.py tests/test_triton_subset_attention.py tests/test_triton_trie.py 2>&1 | tail -15 | tee "$OUT/triton_tests.log"
