#!/usr/bin/env bash
# The scale answer in one lent accelerator call (benchmarks/gpu_run.py says what it runs and writes):
#   bash benchmarks/gpu_run.sh --prepare [--offline]             # here, before: .data/ and .whl/ (ignored) and the command
#   bash benchmarks/gpu_run.sh --output DIR [--preset vits|tiny]  # on the lent machine (exits 2 without a GPU)
#   bash benchmarks/gpu_run.sh --smoke --data DIR --output DIR    # the same path on a CPU: tiny model, one epoch
# The budget (--minutes, default 8) runs from this line.
set -euo pipefail
export GPU_RUN_STARTED=${GPU_RUN_STARTED:-$(date +%s.%N)}
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  shift
  exec python3 -m benchmarks.lent_prepare "$@"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec python3 -m benchmarks.gpu_run "$@"
