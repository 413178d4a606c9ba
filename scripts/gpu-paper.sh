#!/usr/bin/env bash
# As much of the paper *as produced* (50,000 epochs) as fits one short GPU call, most valuable
# first, each experiment packed into OUT_DIR as soon as it ends (or is cut off), so that a call
# stopped at its limit still brings back what finished:
#   1. Table 3's four OffsetL2 models in the author's coded form (never measured at full scale);
#   2. Table 1's Abs and Abs2 at 50,000 epochs (ReLU and ReLU2-Neg were checked before), which
#      with their 5,000-epoch readings test "Table 1 is a 50,000-epoch result" on two more models.
# TF32 products (labelled in every report); full MNIST; paired seeds, so run i of every model in
# both experiments starts from the same first-layer weights.
# Usage: scripts/gpu-paper.sh MNIST_DIR OUT_DIR [SECONDS]   (SECONDS: the whole pass, default 560)
# Environment: OFFSETL2_RUNS (2), BASELINE_RUNS (2), PRECISION (tf32), DEVICE (cuda), and
# EXTRA_ARGS, added to every reproduce (e.g. "--epochs 40 --train-subset 500" for a dry test).
set -u
default_budget=560
source "$(dirname "$0")/gpu-lib.sh" "$@"
precision=${PRECISION:-tf32}
work=${WORK:-/tmp/distrep-paper}
mkdir -p "$work"
pack() {   # pack NAME: the experiment directory, without the checkpoint once results exist
    local exclude=()
    [[ -f $work/$1/summary.csv ]] && exclude=(--exclude=checkpoint.safetensors)
    tar -czf "$out/$1.tar.gz" -C "$work" "${exclude[@]}" --exclude=.distrep.lock "$1" 2>>"$log"
    ls -la "$out/$1.tar.gz" | tee -a "$log"
}
reproduce() {   # reproduce NAME SECONDS PRESET ARGS...
    local name=$1 limit=$2 preset=$3; shift 3
    step 60 "$python" -m distrep.cli reproduce "$preset" --dry-run --device "$device" \
        --precision "$precision" "$@" ${EXTRA_ARGS:-}
    step "$limit" "$python" -m distrep.cli reproduce "$preset" --device "$device" \
        --precision "$precision" --max-memory 40G --checkpoint-every 30 --quiet \
        --out "$work/$name" "$@" ${EXTRA_ARGS:-}
    pack "$name"
}

step 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 40 "$python" -m distrep.cli data fetch mnist --from "$data"
# The OffsetL2 experiment gets all but the ~150 s that the baselines need.
reproduce table3-offsetl2 "$(left 150)" table3 --models ReLU-L2,ReLU-L2-Neg,Abs-L2,Abs-L2-Neg \
    --runs "${OFFSETL2_RUNS:-2}"
reproduce table1-abs "$(left 10)" table1 --models Abs,Abs2 --runs "${BASELINE_RUNS:-2}"
echo "=== done after ${SECONDS}s" | tee -a "$log"
