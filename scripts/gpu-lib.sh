# Shared by the GPU scripts (sourced): the environment, and `step`/`left` that run each part
# of a pass under a time limit, logged to $log, never stopping the pass.
# Sourced with the script's arguments, MNIST_DIR OUT_DIR [SECONDS]: sets $data, $out (the folder
# to log into), $budget (seconds the whole pass may take; default $default_budget) and $device.
# MNIST_DIR holds the idx files, plain or .gz (`distrep data fetch mnist --from` reads either); for
# a machine without a network, `scripts/gpu-data.sh` puts them (and Fashion-MNIST's) gzipped in
# .gpu-data/mnist (and .gpu-data/fashion-mnist), an ignored folder that the device tool carries.
usage="usage: $0 MNIST_DIR OUT_DIR [SECONDS]"
data=${1:?$usage}
out=${2:?$usage}
budget=${3:-$default_budget}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 DISTREP_OFFLINE=1
export DISTREP_DATA=${DISTREP_DATA:-/tmp/distrep-data}
log=$out/log.txt

step() {   # step SECONDS COMMAND...: SIGINT at the limit (distrep and pytest stop cleanly), KILL 20 s later
    local limit=$1; shift
    if (( limit <= 5 )); then echo "=== skipped (no time left): $*" | tee -a "$log"; return; fi
    echo "=== [$(date +%T), ${SECONDS}s] $* (limit ${limit}s)" | tee -a "$log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]} after ${SECONDS}s" | tee -a "$log"
}
left() { echo $(( budget - SECONDS - ${1:-0} )); }
