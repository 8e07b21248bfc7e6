#!/usr/bin/env bash
# One GPU run, under 8 minutes on one H100/H200 (see bench/README.md, "On a GPU"):
#   1. the ORPO loss alone from hidden states: orpo's chunked log-probs vs LigerFusedLinearORPOLoss
#      vs plain torch (bench/loss.py: forward+backward time, peak memory; Qwen2.5-0.5B's head);
#   2. training steps of a Qwen2.5-0.5B-shaped model (random init, bf16, max_length 1024, vocab
#      151,936): orpo vs TRL's ORPOTrainer vs TRL with use_liger_kernel (bench/run.py).
#
# The GPU machine has no network: run `bash bench/fetch_gpu_wheels.sh` here first, and carry .whl/
# (git-ignored; trl, liger-kernel, datasets, ..., and the HH pairs). Results go to $OUT (or runs/gpu).
#
#   bash bench/gpu.sh                  # on the GPU machine
#   bash bench/gpu.sh --cpu-dry-run    # the same steps with tiny shapes on a CPU (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  LOSS_ARGS=(--device cpu --tiny)
  RUN_ARGS=(--device cpu --settings tiny --max-length 128 --batch-size 2 --steps 2 --warmup 1
            --systems orpo trl)
else
  LOSS_ARGS=(--device cuda)
  RUN_ARGS=(--device cuda --dtype bfloat16 --settings qwen2.5-0.5b --max-length 1024 --batch-size 8
            --steps 6 --warmup 2 --systems orpo trl trl-liger orpo-logps-full)
fi

# Install only the wheels whose distribution the machine lacks (keep its own torch stack).
SITE=${SITE:-/tmp/site}
missing=()
WHEELS=${WHEELS:-.whl}
for whl in "$WHEELS"/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1)
  if ! "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
    missing+=("$whl")
  fi
done
echo "installing ${#missing[@]} wheels into $SITE: ${missing[*]##*/}"
if (( ${#missing[@]} )); then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}"
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, transformers, trl, datasets, liger_kernel, orpo; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

DATA=../shared/data/hh-rlhf/harmless-dev.jsonl.gz
[[ -f "$DATA" ]] || DATA=$WHEELS/harmless-dev.jsonl.gz

started=$SECONDS
echo "== the loss alone"
"$PY" bench/loss.py "${LOSS_ARGS[@]}" --out "$OUT/loss.json" || echo "bench/loss.py failed (exit $?)"
echo "== training steps ($((SECONDS - started)) s so far)"
"$PY" bench/run.py "${RUN_ARGS[@]}" --trl-python "$PY" --data "$DATA" --out /tmp/orpo-bench \
  --results "$OUT/gpu.json" || echo "bench/run.py failed (exit $?)"
echo "done in $((SECONDS - started)) s; results in $OUT/loss.json and $OUT/gpu.json"
