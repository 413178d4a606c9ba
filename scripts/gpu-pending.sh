#!/usr/bin/env bash
# What is still owed a GPU, in one pass, most important first (issue 11 and the README):
#   1. IEEE fp32's step with its output layer's three small products in three TF32 passes
#      (distrep.fused.HEAD_PRODUCTS["fp32"] = "3xtf32"; the first layer's products stay IEEE in
#      cuBLAS), 45 % fewer kernel instructions (docs/kernel-stats/sm90-32x4-fp32-heads.txt),
#      and with the weight gradient reading the input example-major too (GRADIENT_OPERAND):
#      scripts/shape-check.py runs `bench` in fp32 with the present kernel, with the three-pass
#      output layer, and with both, side by side, Table 1 and Table 3, each with its fraction of
#      the GEMM peak (the target: 90 %), then both with a stream per variant and with the
#      pipeline (its kernel now on tensor cores, beside the SIMT products instead of contending
#      for their FMA pipes), then the CUDA tests with both (the fused step against the CPU, the
#      three passes against IEEE fp32, graphs and streams bit for bit, the memory plan); ~5 min;
#   2. IEEE fp32's kernel at other shapes (scripts/fused-tune.py, TUNE_SHAPES: examples per
#      block x warps x blocks per program x pipeline stages, distrep.fused.SHAPES; one warp per
#      program counts up to 12 % fewer instructions per SM but leaves fewer warps per SM unless
#      one stage frees shared memory: docs/engine.md, "Fewer warps per program"), Table 1's six
#      variants x 20 runs; then the fastest (scripts/shape-check.py --pick): `bench` at the
#      present shape and at it, and its CUDA tests (nothing, if the present shape is the fastest);
#      ~2-4 min;
#   3. `distrep reproduce table1 --dry-run` in bf16: the time estimate, since it warms up the
#      test pass (it said 2.9 h for a run that took 5.2 min; it should now say about 5 min);
#      and the GPU's facts as a Ray worker tells them to a driver without one (a CUDA test);
#   4. scripts/fp32-products.py: fp32's two first-layer products as the step runs them against
#      other layouts, all variants in one product and cuBLASLt; ~1 min;
#   5. the study beyond the paper at full scale (scripts/gpu-paper.sh with PARTS="beyond-mnist
#      beyond-fashion-mnist", PRECISION tf32 unless BEYOND_PRECISION says otherwise) with what is
#      left of the budget: resumable, so repeat the call at once (same WORK) until its log says
#      both members and the report over both are done.
# Each part stops at its limit or at the pass's budget, whichever comes first; parts 1-4 should
# take about 9 minutes, so give the first call 590 s and a second SKIP="1 2 3 4" for the study.
# Usage: scripts/gpu-pending.sh MNIST_DIR OUT_DIR [SECONDS]   (default 560)
# MNIST_DIR as for the other GPU scripts (gpu-lib.sh); Fashion-MNIST's idx files in FASHION_DIR
# (default: fashion-mnist beside MNIST_DIR; `scripts/gpu-data.sh` fills .gpu-data/mnist and
# .gpu-data/fashion-mnist). WORK as for gpu-paper.sh
# (use an ignored folder of the checkout, e.g. WORK=$PWD/.gpu-data/beyond, so a warm machine keeps
# it between calls; carry .gpu-data/mnist and .gpu-data/fashion-mnist, not .gpu-data, whose copy
# would replace WORK there). SKIP="1 2 3 4" skips parts 1 to 4 (a second call). DEVICE=cpu with
# PRODUCTS_ARGS="--device cpu --runs 2 --variants 2 --n 2000 --square 512", TUNE_RUNS=2 TUNE_DEVICE=cpu
# TUNE_SUBSET=64 TRITON_INTERPRET=1, SHAPE_ARGS="--train-subset 64
# --epochs 1 --runs 2", BEYOND_PRECISION=fp32, RUNS=2 and EXTRA_ARGS="--epochs 20 --train-subset
# 200" is a smoke test without a GPU (a few minutes).
set -u
default_budget=560
source "$(dirname "$0")/gpu-lib.sh" "$@"
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }

upto() { local l; l=$(left 10); echo $(( $1 < l ? $1 : l )); }   # at most $1 s, within the budget

step 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 40 "$python" -m distrep.cli data fetch mnist --from "$data"
if ! skip 1; then
    step "$(upto 330)" "$python" scripts/shape-check.py fp32 32x4x8x3 --head-products 3xtf32 --operand rows \
        --streams 1,pipeline --device "$device" ${SHAPE_ARGS:-}
fi
if ! skip 2; then
    step "$(upto 120)" env TUNE_PRECISIONS=fp32 TUNE_EXTRAS=0 \
        TUNE_MODELS="Abs,ReLU,Abs2,Abs2-Neg,ReLU2,ReLU2-Neg" "$python" scripts/fused-tune.py \
        "${TUNE_RUNS:-20}" ${TUNE_SHAPES:-32x4x8x3 32x1x8x3 32x1x8x1 32x4x8x1}
    step "$(upto 200)" "$python" scripts/shape-check.py fp32 32x4x8x3 --pick "$log" \
        --device "$device" ${SHAPE_ARGS:-}
fi
if ! skip 3; then
    step "$(upto 60)" "$python" -m distrep.cli reproduce table1 --dry-run --device "$device" \
        --precision bf16 --max-memory 40G ${EXTRA_ARGS:-}
    step "$(upto 40)" "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k facts_lent
fi
if ! skip 4; then
    step "$(upto 90)" "$python" scripts/fp32-products.py ${PRODUCTS_ARGS:-}
fi
# the beyond study with the rest of the budget (gpu-paper.sh keeps 60 s of it for packing)
rest=$(left 0)
echo "=== [$(date +%T), ${SECONDS}s] the beyond study, ${rest}s left" | tee -a "$log"
if (( rest > 150 )); then
    PARTS="beyond-mnist beyond-fashion-mnist" PRECISION=${BEYOND_PRECISION:-tf32} \
        bash "$(dirname "$0")/gpu-paper.sh" "$data" "$out" "$rest"      # the same log, the same 8 files
fi
echo "=== done after ${SECONDS}s" | tee -a "$log"
