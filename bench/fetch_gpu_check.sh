#!/usr/bin/env bash
# What bench/gpu_check.sh needs on the GPU machine (no network there), fetched here into .gpu_check/
# (git-ignored; carry it): only the wheels the GPU image (python 3.12, torch, transformers, accelerate,
# peft, pyarrow) lacks, DeepSpeed built here with no ops, bitsandbytes cut down to its CUDA 13
# library, the stories260K model and the HH pairs. Fails if the folder passes 40 MiB (the carry limit).
#
#   bash bench/fetch_gpu_check.sh      # a few minutes (the DeepSpeed build); prints what it got
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu_check}
PY=${PY:-.venv/bin/python}
PYVER=3.12
LIMIT_MIB=40
DS_VERSION=${DEEPSPEED_VERSION:-0.19.8}
# replace only a folder this script made (DEST=~ must not empty a home folder)
if [[ -e "$DEST" && ! -e "$DEST/.made-by-fetch_gpu_check" ]]; then
  echo "refusing to replace $DEST: it was not made by bench/fetch_gpu_check.sh" >&2
  exit 2
fi
rm -rf "$DEST"
mkdir -p "$DEST/wheels"
touch "$DEST/.made-by-fetch_gpu_check"
W=$(realpath "$DEST/wheels")
source bench/wheels.sh

# orpo's own needs and datasets', plus what DeepSpeed imports (hjson, ninja, py-cpuinfo)
download_pure "$PY" $PYVER "$W" "${RUNTIME_PURE[@]}" hjson py-cpuinfo
download_binary "$PY" $PYVER "$W" "${RUNTIME_BINARY[@]}" ninja

# DeepSpeed is an sdist on PyPI; its setup.py imports torch, so build against .venv's torch, no ops
# (ZeRO-2/3 with orpo's torch AdamW needs none): a py3-none-any wheel.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp/ds" "deepspeed==$DS_VERSION" \
   && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W" "$tmp"/ds/deepspeed-*.tar.gz; then
  echo "deepspeed $DS_VERSION: built"
else
  echo "deepspeed $DS_VERSION: COULD NOT BE BUILT (zero2/zero3 will fail on the GPU machine)"
fi

# bitsandbytes ships a library per CUDA version (~20 MiB each): keep only CUDA 13's (torch is cu130)
if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version $PYVER --implementation cp \
     --abi cp312 --abi abi3 --abi none --platform manylinux_2_24_x86_64 "${MANYLINUX[@]}" -d "$tmp/bnb" bitsandbytes; then
  whl=$(ls "$tmp"/bnb/bitsandbytes-*.whl)
  mkdir "$tmp/bnb/x"
  (cd "$tmp/bnb/x" && unzip -q "$whl")
  if ls "$tmp"/bnb/x/bitsandbytes/libbitsandbytes_cuda13*.so >/dev/null 2>&1; then
    # keep CUDA 13.0's library and the CPU one; drop the other CUDA, ROCm and XPU builds
    find "$tmp/bnb/x/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' \
      ! -name 'libbitsandbytes_cpu.so' -delete
    # the RECORD lists the deleted files; pip installs from it without checking absent ones' hashes,
    # but drop their lines so the wheel stays consistent
    sed -i '/libbitsandbytes_[a-z0-9]*\.so/{/cuda130\|_cpu/!d}' "$tmp"/bnb/x/bitsandbytes-*.dist-info/RECORD
    (cd "$tmp/bnb/x" && zip -q -r "$W/$(basename "$whl")" .)
    echo "bitsandbytes: $(basename "$whl") trimmed to $(cd "$tmp/bnb/x/bitsandbytes" && ls libbitsandbytes_*.so | tr '\n' ' ')"
  else
    echo "bitsandbytes: $(basename "$whl") has no CUDA 13 library: NOT INCLUDED (qlora will be skipped)"
  fi
else
  echo "bitsandbytes: COULD NOT BE DOWNLOADED (qlora will be skipped)"
fi

# the model and the data (shared/ does not travel)
mkdir -p "$DEST/stories260K"
cp ../shared/assets/stories260K/hf/* "$DEST/stories260K/"
cp ../shared/data/hh-rlhf/harmless-dev.jsonl.gz "$DEST/"

ls -la "$W"/bitsandbytes-*.whl "$W"/deepspeed-*.whl
size_kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $((size_kib / 1024)) MiB ($size_kib KiB) in all, limit $LIMIT_MIB MiB"
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "ERROR: $DEST is over $LIMIT_MIB MiB: it cannot be carried" >&2
  exit 1
fi
