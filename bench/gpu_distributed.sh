python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
# The GPU check of docs/distributed.md, on one H100/H200 in under 4 minutes: fsdp2 and zero3 on one
# process each (wrapping through Accelerate's plugins, sharded save, resume from the middle of the
# run with the losses compared to the uninterrupted run, `orpo checkpoints`), then a short LoRA run
# under fsdp2 and zero3 on the real stories260K model.
#
# Needs in .whl/ (the machine has no network): bash bench/fetch_gpu_wheels.sh (datasets, pydantic,
# ...), bash bench/fetch_deepspeed_wheel.sh (deepspeed, hjson), and the stories260K model:
#   mkdir -p .whl/stories260K && cp ../shared/assets/stories260K/hf/* .whl/stories260K/
# Run from the repository root: bash bench/gpu_distributed.sh   (results: $OUT/gpu_distributed.{log,json})
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_distributed}
RUNS=${RUNS:-/tmp/orpo-gpu}
mkdir -p "$OUT"
rm -rf "$RUNS"
LOG="$OUT/gpu_distributed.log"
exec > >(tee "$LOG") 2>&1
nvidia-smi -L
python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || echo "deepspeed: not importable"

# A 25M-parameter Llama on the quickstart data and tokenizer (in the repository), bf16 autocast,
# constant learning rate (so a run resumed with the same max_steps is the same run).
COMMON=(examples/quickstart.yaml model.init.hidden_size=512 model.init.intermediate_size=1376
        model.init.num_hidden_layers=8 model.init.num_attention_heads=8 model.init.num_key_value_heads=8
        train.mixed_precision=bf16 train.lr_scheduler=constant train.warmup_steps=0 train.learning_rate=1e-3
        train.max_steps=30 train.save_every=10 train.save_total_limit=3 train.eval_every=30 train.log_every=1
        ${DRY_RUN_OVERRIDES:-})  # e.g. a smaller model for a CPU dry run of this script
LORA=(examples/quickstart.yaml model.init=null model.name_or_path=.whl/stories260K model.tokenizer=null
      model.chat_template=chatml
      "model.lora={r: 8, alpha: 16, dropout: 0.0}" train.mixed_precision=bf16 train.lr_scheduler=constant
      train.warmup_steps=0 train.learning_rate=1e-3 train.max_steps=20 train.save_every=10 train.eval_every=20
      train.log_every=1)
declare -A STATUS

orpo1() {  # one process, as a distributed launch (FSDP2 and ZeRO need one, even for one process)
  python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m orpo.cli train "$@"
}

run() {  # run NAME CMD...: time it, record its exit status
  local name=$1; shift
  echo; echo "=== $name: $*"
  local t0=$SECONDS
  "$@"; local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
}

resume_check() {  # ENGINE: cut a finished run back to its step-10 checkpoint, resume, compare losses
  local engine=$1 dir="$RUNS/$1"
  rm -rf "$dir-resumed"; cp -r "$dir" "$dir-resumed"
  rm -rf "$dir-resumed/final" "$dir-resumed/checkpoints/step-20" "$dir-resumed/checkpoints/step-30"
  orpo1 "${COMMON[@]}" train.distributed="$engine" train.output_dir="$dir-resumed" train.resume=auto \
    && python3 - "$dir" "$dir-resumed" <<'EOF'
import json, sys
def rows(d):
    return {r["step"]: r for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r}
a, b = rows(sys.argv[1]), rows(sys.argv[2])
worst = max(abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in range(11, 31))
print(f"resumed at step 10, steps 11-30: max relative loss difference {worst:.2e}")
sys.exit(0 if worst < 1e-2 else 1)
EOF
}

run fsdp2 orpo1 "${COMMON[@]}" train.distributed=fsdp2 train.output_dir="$RUNS/fsdp2"
run fsdp2-checkpoints python3 -m orpo.cli checkpoints "$RUNS/fsdp2"
run fsdp2-resume resume_check fsdp2
run zero3 orpo1 "${COMMON[@]}" train.distributed=zero3 train.output_dir="$RUNS/zero3"
run zero3-checkpoints python3 -m orpo.cli checkpoints "$RUNS/zero3"
run zero3-resume resume_check zero3
run fsdp2-lora orpo1 "${LORA[@]}" train.distributed=fsdp2 train.output_dir="$RUNS/fsdp2-lora"
run zero3-lora orpo1 "${LORA[@]}" train.distributed=zero3 train.output_dir="$RUNS/zero3-lora"
for d in fsdp2 zero3 fsdp2-lora zero3-lora; do ls "$RUNS/$d/final" 2>/dev/null | tr '\n' ' ' | sed "s|^|$d/final: |"; echo; done

python3 - "$OUT/gpu_distributed.json" "${!STATUS[@]}" -- "${STATUS[@]}" <<'EOF'
import json, sys
args = sys.argv[2:]
cut = args.index("--")
result = dict(zip(args[:cut], args[cut + 1:]))
json.dump(result, open(sys.argv[1], "w"), indent=1, sort_keys=True)
print(json.dumps(result, indent=1, sort_keys=True))
EOF
echo "total ${SECONDS} s"
