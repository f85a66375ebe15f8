#!/usr/bin/env bash
# Inductor's tuning knobs on guided sampling (bench_guided_sampling.py, SiT-B/1, 50-step SDE, CFG 4, path drop,
# batch 256): whole-model and regional compilation with the defaults, with max-autotune (Triton GEMM templates
# with fused epilogues, benchmarked against cuBLAS) and with coordinate-descent tuning of the generated kernels.
#
#   bash benchmarks/inductor_knobs_gpu.sh [LIMIT_S]     # each run stopped after LIMIT_S seconds (default 200)
set -u
cd "$(dirname "$0")/.."
limit=${1:-200}
export PYTHONUNBUFFERED=1
bench=benchmarks/bench_guided_sampling.py

timed() {  # LABEL ENV... python ARGS...
    local label=$1 start=$SECONDS
    shift
    echo "== $label"
    timeout "$limit" env "$@" 2>&1 | grep -E "^guided|Error" | grep -v "out of resource"
    echo "   ($((SECONDS - start)) s)"
}

timed "whole model" python $bench
timed "whole model, max-autotune" TORCHINDUCTOR_MAX_AUTOTUNE=1 python $bench
timed "whole model, coordinate descent" TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 python $bench
timed "regional" python $bench --compile-mode regional
timed "regional, max-autotune" TORCHINDUCTOR_MAX_AUTOTUNE=1 python $bench --compile-mode regional
