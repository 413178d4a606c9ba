#!/usr/bin/env bash
# The engine's speed and reduced precision on one GPU (issue 11), most important first:
#   1. a CUDA stream per variant (the default for the fused step in TF32, 3xTF32 and bf16 since
#      an H200 timed it: docs/engine-h200-fused/; DISTREP_CUDA_STREAMS=0/1 forces it off/on) and
#      the two-stream pipeline (=pipeline, opt-in: slower in fp32): their test, the same bits as
#      one stream; --precision 3xtf32 (fp32 data, every product on tensor cores as three TF32
#      products of exact halves): its test against fp32 and the CPU, and its CUDA graphs and
#      streams bit for bit (tests/test_cuda.py);
#   2. `distrep bench` of the fused step in fp32, 3xTF32, TF32 and bf16: one stream, a stream
#      per variant, then the pipeline (fp32 and 3xTF32), back to back on the same GPU;
#   3. 3xTF32 against fp32, run by run from the same seeds (`bench --accuracy`, fused step),
#      every Table 1 and Table 3 model on full MNIST, into OUT_DIR/accuracy/ (ACCURACY_PRECISIONS
#      adds others: TF32 and bf16 were judged on an H100, docs/engine-h100-fused/pass3/);
#   4. the fused and graph tests of tests/test_cuda.py (the fused step against the CPU, CUDA
#      graphs bit for bit, the expanded OffsetL2 kernel's gradients and distances in TF32/bf16,
#      a register cap changing no bit);
#   5. the fused step's shapes and OffsetL2 kernels timed (scripts/fused-tune.py), to choose
#      BLOCK_N, NUM_WARPS, BLOCKS_PER_PROGRAM (and to hold scripts/kernel-stats.py's
#      predictions against), and where a step's time goes;
#   6. `distrep bench`, fused and hand-written side by side, as by default: Table 1's and Table
#      3's variants x 20 runs, full MNIST, fp32 / TF32 / bf16: run-epochs/s, fraction of the GEMM
#      peak, projected time of the whole paper;
#   7. the rest of tests/test_cuda.py and the CUDA case of the SIGKILL-and-resume test (`auto`
#      takes the fused step on CUDA, with CUDA graphs, so these now check it).
# On an H200 (2026-11-28, commit 2ea34b8; docs/engine-h200-3xtf32/) SKIP="5 6 7" took 445 s
# (part 1 127 s, part 2 100 s, part 3 101 s, part 4 117 s), then FROM=6 216 s and FROM=5 SKIP="6 7"
# 105 s, each on the machine the call before left warm: the whole script fits two calls.
# Each part is time-limited (never past the budget) and logged as it goes, so a pass cut short
# still brings back what finished; FROM=K skips parts 1..K-1 (for a second call: the set-up
# always runs); SKIP="K L" skips the parts named. Usage: scripts/gpu-engine.sh MNIST_DIR OUT_DIR [SECONDS]  (default 560)
# Environment: FROM (1), SKIP (none), ACCURACY_PRECISIONS (3xtf32), ACCURACY_RUNS (16), ACCURACY_EPOCHS (500),
# BENCH_EPOCHS (5), DEVICE (cuda).
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
    if [[ " ${SKIP:-} " == *" ${part_no} "* ]]; then echo "=== part ${part_no} skipped (SKIP=${SKIP}): $*" | tee -a "$log"; return; fi
    "$@"
}
upto() { local l; l=$(left 10); echo $(( $1 < l ? $1 : l )); }   # at most $1 s, within the budget
bench=("$python" -m distrep.cli bench --device "$device" --epochs "${BENCH_EPOCHS:-5}" --max-memory 40G)

step 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 40 "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 60 "$python" -m distrep.cli data fetch mnist --from "$data"
part step "$(upto 150)" "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k "concurrent_streams or 3xtf32"
part step "$(upto 260)" bash -c "DISTREP_CUDA_STREAMS=0 ${bench[*]} --engine fused --precisions fp32,3xtf32,tf32,bf16
    DISTREP_CUDA_STREAMS=1 ${bench[*]} --engine fused --precisions 3xtf32,tf32,bf16
    DISTREP_CUDA_STREAMS=pipeline ${bench[*]} --engine fused --precisions fp32,3xtf32"
part step "$(upto 160)" "$python" -c "
from distrep import bench
bench.accuracy_check('$device', tuple('${ACCURACY_PRECISIONS:-3xtf32}'.split(',')), ${ACCURACY_RUNS:-16},
                     ${ACCURACY_EPOCHS:-500}, None, 'fused', '$out/accuracy')"
part step "$(upto 220)" "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k "fused or graphs"
part step "$(upto 100)" "$python" scripts/fused-tune.py 20
part step "$(upto 100)" "${bench[@]}" --engine fused,hand-written --precisions fp32,tf32,bf16
part step "$(left 10)" "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k "not fused and not graphs and not 3xtf32" \
    "tests/test_cli.py::test_sweep_killed_by_a_signal_resumes_bit_identically"
echo "=== done after ${SECONDS}s" | tee -a "$log"
