#!/usr/bin/env bash
# The checks that need a GPU (never part of CI), in under 8 minutes on one GPU:
#   1. the happy-tweet recipe on one GPU with bf16 (accelerate_configs/single_gpu.yaml), 20 iterations;
#   2. 5 iterations each under DeepSpeed ZeRO-2 and FSDP2 with one process (the paths docs/distributed.md offers);
#   3. the benchmark against TRL's RLOO and OnlineDPO with LoRA (scripts/benchmark.py), with a separate reward model
#      and with r_x as a third adapter on the same base, on $SMOLLM2 when set (a folder from
#      scripts/convert_smollm2.py), else on the embedded tweet GPT-2.
# Writes JSON under $OUT (default outputs/gpu_check): device.json, checks.jsonl (one line per check: rc, seconds), each
# run's summary.json, the benchmark's results.json; and each check's log. Needs the project's dependencies with a CUDA
# torch (deepspeed for ZeRO-2). A failed check is recorded and the next one runs.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
: > "$OUT/checks.jsonl"

check() {  # check NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"check\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/checks.jsonl"
}

"$PY" - > "$OUT/device.json" <<'PYEOF'
import json, torch
print(json.dumps({"cuda": torch.cuda.is_available(), "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}))
PYEOF
cat "$OUT/device.json"

RECIPE=(recipes/happy_tweet/train.py --config recipes/happy_tweet/config.yaml --save_strategy no --report_to none
        --num_eval_prompts 64)
"$PY" -c "from bilevel_rlhf.happy_tweet import get_default_model; get_default_model()"  # build the model once
check recipe_single_gpu_bf16 240 accelerate launch --config_file accelerate_configs/single_gpu.yaml "${RECIPE[@]}" \
  --max_steps 80 --output_dir "$OUT/recipe_single_gpu_bf16"
check recipe_zero2 120 accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 1 "${RECIPE[@]}" \
  --max_steps 20 --output_dir "$OUT/recipe_zero2"
check recipe_fsdp2 120 accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 1 "${RECIPE[@]}" \
  --max_steps 20 --output_dir "$OUT/recipe_fsdp2"
MODEL=()
if [ -n "${SMOLLM2:-}" ]; then MODEL=(--model "$SMOLLM2"); fi
check benchmark_lora 120 "$PY" scripts/benchmark.py "${MODEL[@]}" --use_peft true --gridworld false --steps 5 \
  --output_dir "$OUT/benchmark_lora"
check benchmark_lora_reward_adapter 120 "$PY" scripts/benchmark.py "${MODEL[@]}" --use_peft true --reward_adapter true \
  --gridworld false --steps 5 --output_dir "$OUT/benchmark_lora_reward_adapter"
