#!/usr/bin/env bash
# Every GPU check in one pass, for a GPU machine held for a few minutes:
#   1. the CUDA tests (engine and reference trainer vs the CPU, chunking, divergence, TF32/bf16,
#      a sweep killed by SIGKILL and resumed bit-identically);
#   2. `distrep bench` on the GPU (GEMM peaks, author-style loop, engine in fp32/bf16/TF32,
#      projected protocol times);
#   3. the TF32 and bf16 accuracy effect (Table 1's variants, full MNIST);
#   4. the Table 1 protocol as the text states it (6 variants x 20 runs x 5,000 epochs), timed,
#      fp32 (the table1 preset trains the 50,000 epochs that produced Table 1's numbers: about
#      70 min in fp32 on an H200, more than one call may take; TABLE1_ARGS can change it).
# Usage: scripts/gpu-check.sh MNIST_DIR OUT_DIR [SECONDS]   (MNIST_DIR: idx or idx.gz files;
# SECONDS: the time the whole pass may take, default 660; the last steps get what is left).
set -u
default_budget=660
source "$(dirname "$0")/gpu-lib.sh" "$@"

step 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 60 "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step 60 "$python" -m distrep.cli data fetch mnist --from "$data"
step 240 "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py \
    "tests/test_cli.py::test_sweep_killed_by_a_signal_resumes_bit_identically"
step 150 "$python" -m distrep.cli bench --device "$device" --epochs 5 ${BENCH_ARGS:-}
step "$(left 360)" "$python" -m distrep.cli bench --device "$device" --runs 1 --epochs 1 \
    --accuracy --accuracy-runs 10 --accuracy-epochs 300 --accuracy-subset 60000 ${BENCH_ARGS:-}
step "$(left 15)" "$python" -m distrep.cli reproduce table1 --device "$device" --max-memory 40G \
    --epochs 5000 --out /tmp/table1 ${TABLE1_ARGS:-}
# The results without the parameters (they are large), for the README's figures.
tar -czf "$out/table1.tar.gz" -C /tmp --exclude='*.safetensors' table1 2>>"$log"
echo "=== done after ${SECONDS}s" | tee -a "$log"
