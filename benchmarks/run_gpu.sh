#!/usr/bin/env bash
# One command for a lent GPU machine (its own torch/triton/transformers are preinstalled):
# the GPU benchmark first (its numbers are what the GPU is for), then the Triton tests compiled for real.
# Results land in $OUT (gpu_benchmark.json, logs). Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [bench-seconds]
# [test-seconds] [many-seconds]. Every precision (fp32, tf32, bf16) by default; BENCH_K="not tf32" (a pytest -k)
# skips some. After the benchmark: evaluate_many grouped vs one by one on the GPU (benchmarks/test_many.py).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD SFTINT_SKIP_EXT=1 OUT
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${1:-420}" python -m pytest benchmarks/test_gpu.py -s -q -p no:cacheprovider ${BENCH_K:+-k "$BENCH_K"} 2>&1 | tail -60 > "$OUT/bench.log"
tail -25 "$OUT/bench.log"
timeout "${3:-90}" python -m pytest benchmarks/test_many.py -s -q -p no:cacheprovider --full 2>&1 | grep -oE "\{'device.*\}|[0-9]+ passed.*|.*(failed|Error).*" > "$OUT/many.log"
cat "$OUT/many.log"
timeout "${2:-150}" python -m pytest -q -x -p no:cacheprovider tests/test_triton_transforms.py tests/test_triton_subset_attention.py tests/test_triton_trie.py 2>&1 | tail -15 | tee "$OUT/triton_tests.log"
