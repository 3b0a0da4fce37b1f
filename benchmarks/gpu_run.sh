#!/usr/bin/env bash
# Everything this project measures on a GPU, in one command, within a fixed budget (default 9 minutes on one H200):
#   1. bench_model.py   our step against transformers' ViTMAE, bf16, MFU, and the host-sync check of our steps
#   2. bench_script.py  run_pretraining.py against the model step, 112 px Imagenette, both input paths
#   3. compare_masking.py  MAE vs SG-MAE (defaults: cached whole-image masks) vs SG-MAE with per-step masks at
#      196 patches (112 px / patch 8), seeds 0 and 1, tables led by the [CLS] probe (MAE's protocol),
#      all six runs side by side on the device, for as many epochs (up to 100) as fit in the rest of the budget at
#      the step rate bench_script.py and the self-guided cost bench_model.py just measured (gpu_plan.py counts).
# Every JSON lands in $OUTPUT (default benchmarks/results/) with the device, the commit and the command in it.
#
#   bash benchmarks/gpu_run.sh --prepare                       # here, before: .data/imagenette and .whl/ (ignored)
#   bash benchmarks/gpu_run.sh [--data DIR] [--output DIR]     # a GPU (exits 2 without one)
#   bash benchmarks/gpu_run.sh --smoke --data DIR --output DIR  # the same path on a CPU: tiny model, a few steps
#
# The data folder must travel with the code: ../shared/data/imagenette (the 112px config) when it is beside the
# checkout, else .data/imagenette. Missing Python packages (datasets, evaluate) are installed from .whl/ when that
# folder holds wheels (a GPU machine that cannot reach PyPI). --prepare makes both from this machine's copies
# (48 MB in all), for a device that receives the checkout with them (e.g. carry: [".data", ".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
DATA=""
OUTPUT=benchmarks/results
BUDGET_MINUTES=${GPU_RUN_MINUTES:-9}
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare)
      mkdir -p .data/imagenette
      cp -r ../shared/data/imagenette/112px ../shared/data/imagenette/README.md .data/imagenette/
      versions=$(python3 -m pip list --format=freeze 2>/dev/null | grep -iE "^(datasets|evaluate|dill|multiprocess)==")
      # shellcheck disable=SC2086
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $versions
      echo "prepared .data/imagenette and .whl ($(du -sh .data .whl | awk '{print $1}' | paste -sd+))"
      exit 0 ;;
    --smoke) SMOKE=1 ;;
    --data) DATA=$2; shift ;;
    --output) OUTPUT=$2; shift ;;
    *) echo "error: unknown argument $1 (--smoke, --data DIR, --output DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import datasets, evaluate" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$SMOKE" = 0 ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA GPU is visible; gpu_run.sh measures a GPU (--smoke runs the same path on the CPU)" >&2
  exit 2
fi
if [ -z "$DATA" ]; then
  for candidate in ../shared/data/imagenette .data/imagenette; do
    [ -d "$candidate/112px" ] && DATA=$candidate && break
  done
fi
[ -n "$DATA" ] && [ -d "$DATA" ] || { echo "error: no dataset folder (--data DIR; Imagenette with its 112px config)" >&2; exit 2; }
DATA_CONFIG=112px
[ -d "$DATA/112px" ] || DATA_CONFIG=""  # the smoke test's generated dataset has a single config
CONFIG_ARGS=(--dataset_name "$DATA")
[ -n "$DATA_CONFIG" ] && CONFIG_ARGS+=(--dataset_config_name "$DATA_CONFIG")
mkdir -p "$OUTPUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
START=$SECONDS
VARIANTS="mae:--mask_strategy random,sgmae:--mask_strategy self_guided"
VARIANTS+=",sgmae_step:--mask_strategy self_guided --informed_mask_source step"

if [ "$SMOKE" = 1 ]; then
  MODEL=configuration/models/sgmae-vit-tiny-patch4-cifar.json
  python3 benchmarks/bench_model.py --device cpu --configs cifar --batch-size 4 --steps 1 --warmup 0 --no-compile \
    --output "$OUTPUT/bench_model_gpu.json"
  PLAN_CONFIG=cifar
  BATCH=8 MAX_EPOCHS=1 STEPS_PER_EPOCH=4 SEEDS=0 RUNS=2
  VARIANTS="mae:--mask_strategy random,sgmae:--mask_strategy self_guided"
  RUN_ARGS=(--max_train_samples 32 --probe_train_samples 32 --probe_eval_samples 16 --probe_epochs 1
    --config_overrides "num_hidden_layers=1,decoder_num_hidden_layers=1")
  SCRIPT_ARGS=(--steps 2 --num_workers 0 --max_train_samples 64)
else
  MODEL=configuration/models/sgmae-vit-tiny-patch8-112.json
  # the compared model first: its self-guided / random ratio sizes the comparison below (the JSON grows per config)
  timeout 200 python3 benchmarks/bench_model.py --device cuda --configs imagenette196,cifar,vitb,vit_tiny \
    --output "$OUTPUT/bench_model_gpu.json" || echo "bench_model.py did not finish in 200 s; going on"
  PLAN_CONFIG=imagenette196
  BATCH=128 MAX_EPOCHS=100 STEPS_PER_EPOCH=73 SEEDS=0,1 RUNS=6  # Imagenette: 9,469 training images
  RUN_ARGS=(--num_workers 4)
  SCRIPT_ARGS=(--steps 40 --num_workers 4 --max_train_samples 4096)
fi
python3 benchmarks/bench_script.py "${CONFIG_ARGS[@]}" --config_name "$MODEL" --batch_size "$BATCH" --repeats 1 \
  "${SCRIPT_ARGS[@]}" --output "$OUTPUT/bench_script_gpu.json"
PLAN=$(python3 benchmarks/gpu_plan.py "$OUTPUT/bench_script_gpu.json" --runs "$RUNS" --batch_size "$BATCH" \
  --seconds_left $(( BUDGET_MINUTES * 60 - (SECONDS - START) )) --steps_per_epoch "$STEPS_PER_EPOCH" \
  --max_epochs "$MAX_EPOCHS" --bench_model_json "$OUTPUT/bench_model_gpu.json" --bench_model_config "$PLAN_CONFIG")
read -r EPOCHS EVAL_EPOCHS <<<"$PLAN"

MINUTES_LEFT=$(python3 -c "print(max(2.0, $BUDGET_MINUTES - ($SECONDS - $START) / 60))")
python3 benchmarks/compare_masking.py "${CONFIG_ARGS[@]}" --config_name "$MODEL" --variants "$VARIANTS" \
  --seeds "$SEEDS" --epochs "$EPOCHS" --eval_epochs "$EVAL_EPOCHS" --batch_size "$BATCH" --base_learning_rate 1e-3 \
  --input_path decode_once --parallel_runs 6 --evaluation_minutes 1.5 --stop_after_minutes "$MINUTES_LEFT" \
  --probe_pooling cls \
  --output_dir "$OUTPUT/imagenette196_gpu" --runs_dir "${RUNS_DIR:-$(mktemp -d)}" "${RUN_ARGS[@]}"
echo "gpu_run.sh: done in $(( SECONDS - START )) s; results in $OUTPUT"
