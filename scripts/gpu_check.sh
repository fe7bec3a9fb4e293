#!/usr/bin/env bash
# One-GPU check, under 8 minutes (each step has a time limit): the efficiency benchmark of the paper's Table 9/10 setting and the
# memory estimate checked against the GPU's allocator.
#
#   GPU_CHECK_OUT=/path/to/results scripts/gpu_check.sh
#
# Writes into $GPU_CHECK_OUT:
#   bench_t5_large/bench.json, bench_t5_large.log  deal_train.bench, t5-large-arch (random weights; the paper's
#                                                   T5-large), DBpedia rows, Table 4's batch 4 x grad-accum 2, fp16,
#                                                   LoRA r=16 on q,v: LoRA vs DEAL (wrapped, folded)
#   estimate_t5_large_{lora,deal}.json/.log        deal_train.estimate_memory with --measure_steps: the analytic
#                                                   estimate next to max_memory_allocated of a real run
#   environment.txt                                 GPU, driver, torch, CUDA
# Needs: the package's dependencies with a CUDA torch, and the benchmark data (DEAL_TRAIN_DATA_DIR or
# ../shared/cl_benchmark next to the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GPU_CHECK_OUT:?set GPU_CHECK_OUT to the directory that receives the results}"
mkdir -p "$GPU_CHECK_OUT"
PY=${PYTHON:-python}
if [ -z "${DEAL_TRAIN_DATA_DIR:-}" ]; then
  for d in ../shared/cl_benchmark /work/shared/cl_benchmark; do
    if [ -d "$d" ]; then export DEAL_TRAIN_DATA_DIR="$(cd "$d" && pwd)"; break; fi
  done
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

{ date; nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"; } > "$GPU_CHECK_OUT/environment.txt" 2>&1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch (see $GPU_CHECK_OUT/environment.txt)" >&2
  exit 1
fi

# The paper's setting (Table 4 and Table 9): T5-large, batch 4, gradient accumulation 2, fp16, LoRA r=16 on q,v,
# lr 1e-5, max source 512 / target 50; rows of DBpedia as prompts (their token lengths; random ids in T5's vocab).
T5_ARGS=(--model t5-large-arch --per_device_train_batch_size 4 --gradient_accumulation_steps 2
         --mixed_precision fp16 --lora_rank 16 --lora_alpha 32 --learning_rate 1e-5 --max_source_length 512
         --max_target_length 50 --chat_template false)

timeout 300 "$PY" -m deal_train.bench "${T5_ARGS[@]}" --methods lora,deal --train_steps 10 --repeats 5 --warmup 1 \
  --inference_samples 16 --inference_batch_size 4 --task dbpedia --output_dir "$GPU_CHECK_OUT/bench_t5_large" \
  2>&1 | tee "$GPU_CHECK_OUT/bench_t5_large.log"

for method in seq_lora deal; do
  name=$([ "$method" = deal ] && echo deal || echo lora)
  timeout 60 "$PY" -m deal_train.estimate_memory "${T5_ARGS[@]}" --method "$method" --profile a100_80gb_fp16 \
    --measure_steps 2 --json "$GPU_CHECK_OUT/estimate_t5_large_$name.json" \
    2>&1 | tee "$GPU_CHECK_OUT/estimate_t5_large_$name.log" || echo "estimate for $method failed (exit $?)"
done

# ---------------------------------------------------------------------------------------------------------------
# Distributed / DeepSpeed checks: scripts/gpu_check_distributed.py, when present, runs here and writes
# into $GPU_CHECK_OUT/distributed. Keep this block last and within the 8-minute budget.
# ---------------------------------------------------------------------------------------------------------------
if [ -f scripts/gpu_check_distributed.py ]; then
  mkdir -p "$GPU_CHECK_OUT/distributed"
  GPU_CHECK_OUT="$GPU_CHECK_OUT/distributed" "$PY" scripts/gpu_check_distributed.py \
    2>&1 | tee "$GPU_CHECK_OUT/distributed.log"
fi
echo "gpu_check: results in $GPU_CHECK_OUT"
