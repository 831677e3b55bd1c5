#!/usr/bin/env bash
# One command for a lent GPU machine (its own torch/triton/transformers are preinstalled), sized for one device call
# (<= 600 s; a session has ~15 min of device time including the machine's start). Most important first:
#   0. the fused elementwise kernels' tests, compiled: if they fail, 1-5 run without those kernels
#   1. the issue's bar: bf16, the three models, n=10 and n=12 (trie flat path, segments path, without the fused
#      elementwise ops, 8192-token passes, torch path, strong naive; peaks; kernel alone) -> gpu_benchmark_bf16.json
#   2. where the time goes: a profile of one bf16 SmolLM2 n=10 evaluation (trie and naive) -> profile_*.json
#   3. the Triton tests compiled for real (not the ahead-of-time compile checks; gpt-oss sinks) -> triton_tests.log
#   4. fp32 at n=10 (exactness at full precision, and the fp32 speed)                 -> gpu_benchmark_fp32.json
#   5. tf32 at n=10, then evaluate_many grouped vs one by one, if time is left
# Results land in $OUT. Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [total-seconds, default 570]
# CPU dry run of the same steps on tiny shapes (Triton interpreted): TINY=1 OUT=/tmp/dry bash benchmarks/run_gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD SFTINT_SKIP_EXT=1 OUT
unset TRITON_INTERPRET
TINY_ARG=""
if [ "${TINY:-0}" = 1 ]; then export TRITON_INTERPRET=1; TINY_ARG="--tiny"; fi
END=$(( $(date +%s) + ${1:-570} ))
left() { local l=$(( END - $(date +%s) )); [ "$l" -gt "$1" ] && echo "$(( l < $2 ? l : $2 ))" || echo 0; }
step() {  # step NAME MIN_SECONDS MAX_SECONDS command...
  local name=$1 t; t=$(left "$2" "$3"); shift 3
  if [ "$t" = 0 ]; then echo "== $name: skipped (time)"; return; fi
  echo "== $name (<= ${t}s)"; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$?"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
PYTEST="python -m pytest -q -s -p no:cacheprovider"
# 0. the fused elementwise kernels compiled for real, first: if they fail, the benchmarks run without them. Only the
#    ops' own tests and the layer loop: the trie runs there autotune the attention kernel (8 compiles per variant)
#    and the environment-switch tests start Pythons, which could run past the limit (a timeout counts as a failure)
echo "== elementwise_check"
ELEMENTWISE="not compile_for_sm90 and not trie_with_triton and not switching_fused and not environment_switch"
if ! timeout 90 $PYTEST -x -k "$ELEMENTWISE" tests/test_triton_elementwise.py > "$OUT/elementwise_check.log" 2>&1; then
  export SFTINT_FUSE_ELEMENTWISE=0; echo "   FAILED: benchmarks run with SFTINT_FUSE_ELEMENTWISE=0 (see elementwise_check.log)"
fi
tail -1 "$OUT/elementwise_check.log"
BENCH_TAG=bf16 step bench_bf16 60 300 $PYTEST benchmarks/test_gpu.py $TINY_ARG --full -k bf16
grep -oE "^\{'device.*\}|[0-9]+ (passed|failed).*" "$OUT/bench_bf16.log" | tail -8
step profile 30 60 python benchmarks/profile_gpu.py --model smollm2-135m --layout n10 --precision bf16 $TINY_ARG
cat "$OUT/profile.log" | grep -v "^STAGE\|^USDT" | tail -22
step triton_tests 30 100 $PYTEST -x -k "not compile_for_sm90" tests/test_triton_transforms.py tests/test_triton_subset_attention.py \
  tests/test_gpt_oss.py tests/test_triton_trie.py
tail -3 "$OUT/triton_tests.log"
BENCH_TAG=fp32 step bench_fp32 40 150 $PYTEST benchmarks/test_gpu.py $TINY_ARG -k "n10 and fp32"
grep -oE "[0-9]+ (passed|failed).*" "$OUT/bench_fp32.log" | tail -2
BENCH_TAG=tf32 step bench_tf32 40 120 $PYTEST benchmarks/test_gpu.py $TINY_ARG -k "n10 and tf32"
step many 30 90 $PYTEST benchmarks/test_many.py --full
python - <<'PY'
import glob, json, os
rows = [r for f in sorted(glob.glob(os.path.join(os.environ["OUT"], "gpu_benchmark_*.json"))) for r in json.load(open(f))]
keys = ("naive_ms", "trie_torch_ms", "trie_triton_ms", "trie_triton_attention_only_ms", "trie_triton_segments_ms",
        "trie_triton_small_passes_ms",
        "ratio_triton_over_naive", "triton_fraction_of_ideal", "peak_GB_naive", "peak_GB_trie_triton",
        "kernel_ms", "kernel_segments_path_ms", "max_abs_dv_triton_vs_naive")
print("model layout prec | " + " | ".join(keys))
for r in rows:
    print(r["model"], r["layout"], r["precision"], "|", " | ".join(f"{r[k]:.3g}" for k in keys))
PY
