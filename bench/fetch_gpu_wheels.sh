#!/usr/bin/env bash
# Wheels for bench/gpu.sh, fetched here (the GPU machine has no network), into .whl/ at the repo root.
#
# The GPU machine has python 3.12, torch, transformers 5.17, accelerate, peft and pyarrow, but not
# trl, liger-kernel, datasets or orpo's other dependencies. This downloads those and what they
# need (bench/wheels.sh; datasets 4.7 is also the oldest trl 1.16 takes); gpu.sh installs only the
# ones the machine lacks. It also copies the HH pairs the bench trains on.
#
#   bash bench/fetch_gpu_wheels.sh            # ~25 MiB into .whl/ (git-ignored); then carry .whl to the GPU
#   PYVER=3.11 bash bench/fetch_gpu_wheels.sh # the same set for python 3.11 (a CPU dry run of gpu.sh here)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"

source bench/wheels.sh
download_pure python3 "$PYVER" "$DEST" trl==1.16.0 liger-kernel==0.8.5 "${RUNTIME_PURE[@]}"
download_binary python3 "$PYVER" "$DEST" "${RUNTIME_BINARY[@]}"

# the pairs bench/run.py trains on (shared/ does not travel to the GPU machine)
cp ../shared/data/hh-rlhf/harmless-dev.jsonl.gz "$DEST/"
du -sh "$DEST"
ls "$DEST"
