#!/usr/bin/env bash
# DeepSpeed for bench/gpu_distributed.sh, built here into .whl/ (the GPU machine has no network).
#
# DeepSpeed is published on PyPI as an sdist only (deepspeed-X.tar.gz, no wheel). Its setup.py
# imports torch, so it is built here with --no-build-isolation against .venv's torch, with no
# prebuilt CUDA ops (DS_BUILD_OPS=0, the default): a pure-python py3-none-any wheel whose ops, if
# ever needed, are JIT-compiled on the GPU machine (it has nvcc and ninja). ZeRO-2/3 with orpo's
# torch AdamW needs no op. Of DeepSpeed's requirements the GPU image lacks hjson and pydantic;
# hjson is fetched here, pydantic (and its own needs) by bench/fetch_gpu_wheels.sh.
#
#   bash bench/fetch_deepspeed_wheel.sh      # ~2.2 MiB into .whl/, ~30 s (the build)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PY:-.venv/bin/python}
VERSION=${DEEPSPEED_VERSION:-0.19.8}
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "deepspeed==$VERSION"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-*.tar.gz
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --platform any \
  -d "$DEST" hjson
ls -la "$DEST"/deepspeed-*.whl "$DEST"/hjson-*.whl
