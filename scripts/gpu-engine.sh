#!/usr/bin/env bash
# The engine's speed and reduced precision on one GPU, in one short call (issue 11):
#   1. the fused step (Triton) on CUDA against the hand-written step on the CPU
#      (tests/test_cuda.py -k fused: every covered model in fp32, three in TF32 and bf16);
#   2. the fused step's block shapes timed (scripts/fused-tune.py), to choose BLOCK_N/NUM_WARPS;
#   3. `distrep bench` with the hand-written and the fused step side by side: Table 1's and
#      Table 3's variants x 20 runs, full MNIST, fp32 / TF32 / bf16: run-epochs/s, fraction of
#      the GEMM peak, projected time of the whole paper (warm-up = kernel compile time, logged);
#   4. a real sweep of Table 1's variants x 20 runs with the fused step in bf16 (1,000 epochs):
#      its run-epochs/s against the bench's, which times the step alone (the sweep also keeps
#      each step's statistics and copies them to the host 100 steps at a time);
#   5. the fused (bf16, TF32) and hand-written (fp32) steps replayed as CUDA graphs
#      (DISTREP_CUDA_GRAPHS=1; step 1's tests check that the replays train bit for bit alike);
#   6. TF32 and bf16 against fp32 with the fused step, run by run from the same seeds
#      (`bench --accuracy`), every Table 1 and Table 3 model on full MNIST, into OUT_DIR/accuracy/;
#   7. the compiled step (torch.compile, CUDA graphs) in TF32 and bf16, if time is left.
# Each step is time-limited and logged as it goes, so a pass cut short still brings back what
# finished. Usage: scripts/gpu-engine.sh MNIST_DIR OUT_DIR [SECONDS]  (default 560)
# Environment: ACCURACY_RUNS (4), ACCURACY_EPOCHS (500), BENCH_EPOCHS (5), DEVICE (cuda).
set -u
default_budget=560
source "$(dirname "$0")/gpu-lib.sh" "$@"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}

step 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 40 "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 60 "$python" -m distrep.cli data fetch mnist --from "$data"
step 150 "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k fused
step 130 "$python" scripts/fused-tune.py 20
step 180 "$python" -m distrep.cli bench --device "$device" --epochs "${BENCH_EPOCHS:-5}" --max-memory 40G \
    --engine auto,fused --precisions fp32,tf32,bf16
step 90 "$python" -m distrep.cli sweep --models Abs,ReLU,Abs2,Abs2-Neg,ReLU2,ReLU2-Neg --runs 20 \
    --epochs 1000 --device "$device" --engine fused --precision bf16 --max-memory 40G --out "$out/sweep-t1"
DISTREP_CUDA_GRAPHS=1 step 120 "$python" -m distrep.cli bench --device "$device" --epochs "${BENCH_EPOCHS:-5}" \
    --max-memory 40G --engine fused --precisions bf16,tf32
DISTREP_CUDA_GRAPHS=1 step 60 "$python" -m distrep.cli bench --device "$device" --epochs "${BENCH_EPOCHS:-5}" \
    --max-memory 40G --engine auto --precisions fp32
step "$(left 100)" "$python" -m distrep.cli bench --device "$device" --no-speed --accuracy --engine fused \
    --accuracy-runs "${ACCURACY_RUNS:-4}" --accuracy-epochs "${ACCURACY_EPOCHS:-500}" \
    --accuracy-subset 60000 --accuracy-out "$out/accuracy"
step "$(left 10)" "$python" -m distrep.cli bench --device "$device" --epochs "${BENCH_EPOCHS:-5}" --max-memory 40G \
    --engine compiled --precisions tf32,bf16
echo "=== done after ${SECONDS}s" | tee -a "$log"
