#!/usr/bin/env bash
# The paper *as produced* on one GPU, 20 runs per model, in as many short calls as it takes:
# each experiment of PARTS runs its `distrep reproduce` preset, in turn, as long as the pass's
# budget allows, and is packed into OUT_DIR as soon as it ends or is cut off, so that a call
# stopped at its limit still brings back what finished:
#   NAME.tar.gz        the experiment without its parameters, per-epoch arrays and checkpoint:
#                      report.md/.html and figures (of an unfinished experiment, its reading at
#                      the last test pass: report-epoch-N.md), summary.csv, config.json, run.json;
#   NAME-data.tar.gz.NN  the parameters (and the per-epoch arrays, where they fit too), for
#                      `distrep analyze` on this side: only what fits in what a call brings back
#                      (8 files of 16 MiB, 64 MiB in all), in pieces of 15 MiB
#                      (`cat NAME-data.tar.gz.* | tar -xz`);
#   claims.md          once table1 and table3-offsetl2 are both finished: `distrep claims` over
#                      their runs (the claims that need both, OffsetL2 against the baselines).
# The experiments (full MNIST, raw pixels, lr 0.001, the epochs that produced the published
# numbers; PRECISION labelled in every report):
#   table3-offsetl2  Table 3's four OffsetL2 models, the author's coded form, 50,000 epochs
#   table1           Table 1's six models, 50,000 epochs (its report reads them at 5,000 too)
#   table2           Table 2's six bias models, 5,000 epochs
#   table1-abs       Table 1's Abs and Abs2 only
#   beyond-mnist, beyond-fashion-mnist   the study beyond the paper (`distrep reproduce beyond`:
#                    Table 1's and Table 3's models and the prior-art heads, standardized inputs,
#                    5,000 epochs), one dataset each, trained into WORK/beyond/<dataset>; once
#                    both are finished, its report over both (beyond-report.tar.gz). Its heads
#                    train on the autograd path, which has no bf16: give PRECISION=tf32 (or fp32).
#                    Fashion-MNIST's idx files come from FASHION_DIR (default: the folder
#                    fashion-mnist beside MNIST_DIR, e.g. .gpu-data/fashion-mnist, which
#                    scripts/gpu-data.sh fills). Not run on a GPU yet.
# Measured on an H200 in bf16 (docs/paper-h200-bf16/, 2026-11-28): table3-offsetl2 258 s,
# table1 309 s, table2 34 s of training, each after ~15-30 s of data check and dry run, and
# before its report and packing (~10 s). A call of at most 10 minutes takes table3-offsetl2 and
# most of table1; so WORK in an ignored folder of the checkout, which a warm device machine
# keeps between calls (WORK=$PWD/.gpu-data/paper), and repeat the same call at once until the
# log says "done" with nothing cut: an experiment finished by an earlier call is skipped, one
# cut off resumes from its checkpoint. The pass keeps 60 s of its
# SECONDS for packing, so give a call at least 120.
# Usage: scripts/gpu-paper.sh MNIST_DIR OUT_DIR [SECONDS]   (SECONDS: the whole pass, default 560)
# Environment: PARTS ("table3-offsetl2 table1 table2"), RUNS (20), PRECISION (bf16), DEVICE (cuda),
# WORK (/tmp/distrep-paper), FASHION_DIR, and EXTRA_ARGS, added to every reproduce (e.g. "--epochs 40
# --train-subset 500" for a dry test; DEVICE=cpu for one without a GPU).
set -u
default_budget=560
source "$(dirname "$0")/gpu-lib.sh" "$@"
precision=${PRECISION:-bf16}
work=${WORK:-/tmp/distrep-paper}
mkdir -p "$work"
limit_files=8 limit_bytes=$((64 * 1024 * 1024)) piece_bytes=$((15 * 1024 * 1024))

room() {   # room BYTES PIECES: whether OUT_DIR can take that many more bytes in that many more files
    local files bytes
    files=$(find "$out" -type f | wc -l)
    bytes=$(du -sb "$out" | cut -f1)
    (( files + $2 <= limit_files && bytes + $1 <= limit_bytes - 1024 * 1024 ))
}

pack() {   # pack NAME: the report (of an unfinished experiment, at its last test pass), then the data
    # (NAME may be a path under WORK, beyond/mnist: its files are named beyond-mnist...)
    local name=$1 dir=$work/$1 file=${1//\//-} epoch tmp bytes pieces
    [[ -d $dir ]] || return
    if [[ ! -f $dir/summary.csv ]]; then          # cut off: read it where it is
        epoch=$("$python" -m distrep.cli report "$dir" 2>&1 | grep -o 'at-epoch [0-9]*' | head -1 | cut -d' ' -f2)
        [[ -n $epoch ]] && step 120 "$python" -m distrep.cli report "$dir" --at-epoch "$epoch"
    fi
    tar -czf "$out/$file.tar.gz" -C "$work" --exclude=checkpoint.safetensors --exclude=.distrep.lock \
        --exclude=params.safetensors --exclude=metrics.npz "$name" 2>>"$log"
    ls -la "$out/$file.tar.gz" | tee -a "$log"
    [[ -f $dir/summary.csv ]] || return          # an unfinished one's data is its checkpoint: too big
    tmp=$(mktemp -d)
    for what in "params.safetensors metrics.npz" "params.safetensors"; do
        (cd "$work" && find "$name" \( -name ${what// / -o -name } \) -print0 \
            | tar -czf "$tmp/data.tar.gz" --null -T -) 2>>"$log"
        bytes=$(stat -c %s "$tmp/data.tar.gz")
        pieces=$(( (bytes + piece_bytes - 1) / piece_bytes ))
        if room "$bytes" "$pieces"; then
            split -b "$piece_bytes" -d "$tmp/data.tar.gz" "$out/$file-data.tar.gz."
            echo "=== $name: data ($what) in $pieces piece(s), $bytes bytes" | tee -a "$log"
            rm -rf "$tmp"; return
        fi
    done
    echo "=== $name: data ($bytes bytes) left behind: no room in what a call brings back" | tee -a "$log"
    rm -rf "$tmp"
}

reproduce() {   # reproduce NAME PRESET ARGS...: trains within what is left of the budget, packs
    local name=$1 preset=$2; shift 2
    if [[ -f $work/$name/summary.csv ]]; then     # finished and packed by an earlier call
        echo "=== $name: finished in an earlier call, skipped" | tee -a "$log"; return
    fi
    if (( $(left 90) <= 0 )); then                # no time to train: the dry run would overrun
        echo "=== $name: no time left in this call" | tee -a "$log"; return
    fi
    step 60 "$python" -m distrep.cli reproduce "$preset" --dry-run --device "$device" \
        --precision "$precision" --runs "${RUNS:-20}" "$@" ${EXTRA_ARGS:-}
    step "$(left 60)" "$python" -m distrep.cli reproduce "$preset" --device "$device" \
        --precision "$precision" --runs "${RUNS:-20}" --max-memory 40G --checkpoint-every 60 \
        --quiet --out "$work/$name" "$@" ${EXTRA_ARGS:-}
    pack "$name"
}

step 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 40 "$python" -m distrep.cli data fetch mnist --from "$data"
if [[ " ${PARTS:-} " == *" beyond-fashion-mnist "* ]]; then
    step 40 "$python" -m distrep.cli data fetch fashion-mnist --from "${FASHION_DIR:-$(dirname "$data")/fashion-mnist}"
fi
for part in ${PARTS:-table3-offsetl2 table1 table2}; do
    case $part in
        table3-offsetl2) reproduce "$part" table3 --models ReLU-L2,ReLU-L2-Neg,Abs-L2,Abs-L2-Neg ;;
        table1) reproduce "$part" table1 ;;
        table2) reproduce "$part" table2 ;;
        table1-abs) reproduce "$part" table1 --models Abs,Abs2 ;;
        beyond-mnist | beyond-fashion-mnist) reproduce "beyond/${part#beyond-}" "$part" ;;
        *) echo "=== unknown part $part (table3-offsetl2, table1, table2, table1-abs, beyond-mnist," \
                "beyond-fashion-mnist)" | tee -a "$log" ;;
    esac
done
if [[ -f $work/beyond/mnist/summary.csv && -f $work/beyond/fashion-mnist/summary.csv \
      && ! -f $out/beyond-report.tar.gz ]]; then
    # both members finished: the study's report over them (nothing is trained again)
    step 120 "$python" -m distrep.cli reproduce beyond --device "$device" --precision "$precision" \
        --runs "${RUNS:-20}" --quiet --out "$work/beyond" ${EXTRA_ARGS:-}
    [[ -f $work/beyond/report.md ]] && tar -czf "$out/beyond-report.tar.gz" -C "$work" \
        beyond/report.md beyond/report.html beyond/figures 2>>"$log"
fi
if [[ -f $work/table1/summary.csv && -f $work/table3-offsetl2/summary.csv && ! -f $out/claims.md ]]; then
    # the paper's claims over Table 1's and Table 3's runs, trained as two experiments
    echo "=== [$(date +%T), ${SECONDS}s] distrep claims table1 table3-offsetl2 > claims.md" | tee -a "$log"
    timeout 60 "$python" -m distrep.cli claims "$work/table1" "$work/table3-offsetl2" \
        > "$out/claims.md.tmp" 2>>"$log" && mv "$out/claims.md.tmp" "$out/claims.md"
    rm -f "$out/claims.md.tmp"
fi
echo "=== done after ${SECONDS}s" | tee -a "$log"
