#!/usr/bin/env bash
# Wheels for bench/gpu.sh, fetched here (the GPU machine has no network), into .whl/ at the repo root.
#
# The GPU machine has python 3.12, torch, transformers 5.17, accelerate, peft and pyarrow, but not
# trl, liger-kernel, datasets or orpo's other dependencies. This downloads those and what they
# need (Requires-Dist of each, checked with `unzip -p .whl/X.whl '*/METADATA' | grep ^Requires-Dist`);
# gpu.sh installs only the ones the machine lacks. It also copies the HH pairs the bench trains on.
# Versions: datasets 4.7 (the oldest trl 1.16 takes) accepts huggingface-hub < 2, like transformers 5.17.
#
#   bash bench/fetch_gpu_wheels.sh            # ~25 MiB into .whl/ (git-ignored); then carry .whl to the GPU
#   PYVER=3.11 bash bench/fetch_gpu_wheels.sh # the same set for python 3.11 (a CPU dry run of gpu.sh here)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"

# pure-python wheels (py3-none-any)
PURE=(
  trl==1.16.0 liger-kernel==0.8.5
  datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 fsspec==2026.2.0 filelock
  pydantic==2.12.5 annotated-types typing-inspection typing-extensions
  rich markdown-it-py mdurl pygments
  requests charset-normalizer idna urllib3 certifi
  httpx httpcore h11 anyio
  python-dateutil six pytz tzdata
  tqdm jinja2 packaging
)
# compiled wheels, for this python on manylinux x86_64
BINARY=(pydantic-core==2.41.5 xxhash pandas==2.3.3 psutil markupsafe pyyaml)

pyver_nodot=${PYVER/./}
for pkg in "${PURE[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation py \
    --platform any -d "$DEST" "$pkg" 2>/dev/null \
  || python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$pkg"
done
for pkg in "${BINARY[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --abi "cp$pyver_nodot" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$pkg"
done

# the pairs bench/run.py trains on (shared/ does not travel to the GPU machine)
cp ../shared/data/hh-rlhf/harmless-dev.jsonl.gz "$DEST/"
du -sh "$DEST"
ls "$DEST"
