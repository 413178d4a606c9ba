#!/usr/bin/env bash
# The engine's speed and reduced precision on one GPU (issue 11), most important first:
#   1. the fused step (Triton) on CUDA against the hand-written step on the CPU, and CUDA-graph
#      replays against eager steps (tests/test_cuda.py -k fused: every covered model in fp32,
#      three in TF32 and bf16; replays bit for bit);
#   2. `distrep bench` with the hand-written and the fused step side by side: Table 1's and
#      Table 3's variants x 20 runs, full MNIST, fp32 / TF32 / bf16: run-epochs/s, fraction of
#      the GEMM peak, projected time of the whole paper (warm-up = kernel compile time, logged);
#   3. the fused step's block shapes timed (scripts/fused-tune.py), to choose BLOCK_N/NUM_WARPS;
#   4. TF32 and bf16 against fp32 with the fused step, run by run from the same seeds
#      (`bench --accuracy`), every Table 1 and Table 3 model on full MNIST, into OUT_DIR/accuracy/;
#   5. the fused step in bf16 and TF32 replayed as a CUDA graph (DISTREP_CUDA_GRAPHS=1);
#   6. a real sweep of Table 1's variants x 20 runs with the fused step in bf16 (1,000 epochs):
#      its run-epochs/s against the bench's, which times the step alone;
#   7. the compiled step (torch.compile, CUDA graphs) in TF32 and bf16.
# Each part is time-limited (never past the budget) and logged as it goes, so a pass cut short
# still brings back what finished; FROM=K skips parts 1..K-1 (for a second call: the set-up
# always runs). Usage: scripts/gpu-engine.sh MNIST_DIR OUT_DIR [SECONDS]  (default 560)
# Environment: FROM (1), ACCURACY_RUNS (4), ACCURACY_EPOCHS (500), BENCH_EPOCHS (5), DEVICE (cuda).
set -u
default_budget=560
source "$(dirname "$0")/gpu-lib.sh" "$@"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
from=${FROM:-1}
part_no=0
part() {   # part COMMAND...: the next numbered part, skipped if before FROM
    part_no=$((part_no + 1))
    if (( part_no < from )); then echo "=== part ${part_no} skipped (FROM=${from}): $*" | tee -a "$log"; return; fi
    "$@"
}
upto() { local l; l=$(left 10); echo $(( $1 < l ? $1 : l )); }   # at most $1 s, within the budget
bench=("$python" -m distrep.cli bench --device "$device" --epochs "${BENCH_EPOCHS:-5}" --max-memory 40G)

step 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 40 "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 60 "$python" -m distrep.cli data fetch mnist --from "$data"
part step "$(upto 170)" "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k fused
part step "$(upto 180)" "${bench[@]}" --engine auto,fused --precisions fp32,tf32,bf16
part step "$(upto 110)" "$python" scripts/fused-tune.py 20
part step "$(upto 150)" "$python" -m distrep.cli bench --device "$device" --no-speed --accuracy --engine fused \
    --accuracy-runs "${ACCURACY_RUNS:-4}" --accuracy-epochs "${ACCURACY_EPOCHS:-500}" \
    --accuracy-subset 60000 --accuracy-out "$out/accuracy"
DISTREP_CUDA_GRAPHS=1 part step "$(upto 130)" "${bench[@]}" --engine fused --precisions bf16,tf32
part step "$(upto 60)" "$python" -m distrep.cli sweep --models Abs,ReLU,Abs2,Abs2-Neg,ReLU2,ReLU2-Neg \
    --runs 20 --epochs 1000 --device "$device" --engine fused --precision bf16 --max-memory 40G --out "$out/sweep-t1"
part step "$(left 10)" "${bench[@]}" --engine compiled --precisions tf32,bf16
echo "=== done after ${SECONDS}s" | tee -a "$log"
