# Sourced by bench/fetch_gpu_wheels.sh and bench/fetch_gpu_check.sh: the wheels orpo (and datasets)
# need on the GPU image, which has python, torch, transformers, accelerate, peft and pyarrow only,
# and the two ways of downloading them for that machine's python (no network there).
# Each pin is checked against the Requires-Dist of its dependents
# (`unzip -p X.whl '*/METADATA' | grep ^Requires-Dist`); datasets 4.7 accepts huggingface-hub < 2,
# like transformers 5.17.

# pure-python wheels (py3-none-any)
RUNTIME_PURE=(
  datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 fsspec==2026.2.0 filelock
  pydantic==2.12.5 annotated-types typing-inspection typing-extensions
  rich markdown-it-py mdurl pygments
  requests charset-normalizer idna urllib3 certifi
  httpx httpcore h11 anyio
  python-dateutil six pytz tzdata
  tqdm jinja2 packaging
)
# compiled wheels, for that python on manylinux x86_64
RUNTIME_BINARY=(pydantic-core==2.41.5 xxhash pandas==2.3.3 psutil markupsafe pyyaml rapidfuzz)
MANYLINUX=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# download_pure PY PYVER DEST PKG...: a py3-none-any wheel, else the manylinux one
download_pure() {
  local py=$1 pyver=$2 dest=$3 pkg
  shift 3
  for pkg in "$@"; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation py \
      --platform any -d "$dest" "$pkg" 2>/dev/null \
    || "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${MANYLINUX[@]}" -d "$dest" "$pkg"
  done
}

# download_binary PY PYVER DEST PKG...: the CPython manylinux wheel for that python
download_binary() {
  local py=$1 pyver=$2 dest=$3 pkg
  shift 3
  for pkg in "$@"; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      --abi "cp${pyver/./}" --abi abi3 --abi none "${MANYLINUX[@]}" -d "$dest" "$pkg"
  done
}
