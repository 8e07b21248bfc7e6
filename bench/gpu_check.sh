#!/usr/bin/env bash
# The prepared GPU check, one H100/H200 in under 8 minutes: versions, tests/test_layouts_gpu.py, a
# single-GPU bf16 run counting CUDA syncs, fsdp2 / fsdp2+cpu_offload / zero2 / zero3 (each with a
# resume from the middle checkpoint, and with LoRA), DPO and eval_generate under fsdp2, QLoRA.
# Results: $OUT/check.log and $OUT/check.json (bench/gpu_check.py runs the stages).
#
# First, here (network): bash bench/fetch_gpu_check.sh, then carry .gpu_check.
#   bash bench/gpu_check.sh                 # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run   # every stage with tiny shapes on a CPU (CUDA-only ones skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
[[ "${1:-}" == "--cpu-dry-run" ]] && PY=${PYTHON:-.venv/bin/python}
SITE=${SITE:-/tmp/gpu_check_site}
mkdir -p "$OUT"
: > "$OUT/check.log"

# Install only the distributions the machine lacks, into their own folder; never the image's torch
# stack (a wheel of those names is refused, not installed).
missing=()
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
for whl in .gpu_check/wheels/*.whl; do
  [[ -e "$whl" ]] || break
  dist=$(basename "$whl" | cut -d- -f1)
  case "${dist,,}" in torch|transformers|accelerate|peft|pyarrow) echo "refusing to shadow $dist"; continue;; esac
  "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$whl")
done
echo "installing ${#missing[@]} wheels into $SITE: ${missing[*]##*/}" | tee -a "$OUT/check.log"
if (( DRY )); then
  echo "dry run: not installing (the venv has orpo's dependencies)" | tee -a "$OUT/check.log"
elif (( ${#missing[@]} )); then
  if ! "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}" >>"$OUT/check.log" 2>&1; then
    echo "ERROR: installing the carried wheels failed (see $OUT/check.log)" | tee -a "$OUT/check.log" >&2
    exit 2
  fi
fi
(( DRY )) || export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
(( DRY )) && export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
[[ "${1:-}" == "--cpu-dry-run" ]] && export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
