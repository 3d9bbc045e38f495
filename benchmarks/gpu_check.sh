#!/usr/bin/env bash
# The device check for a machine with a GPU (see benchmarks/gpu_check.py): the CUDA-marked tests,
# `peerdistill bench` of DML, MCL, L-MCL, PCL, the fused cohort, bf16, fp16 and deterministic=true
# (images/s, host syncs per step, GPU peak memory), an exact kill-and-resume under deterministic=true, and
# a 2-process torchrun epoch when there are two GPUs. About 5 minutes; every stage has a time limit and
# the whole is capped at 7.5.
#
#   benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]     # report in OUT_DIR/report.{md,json}
#
# Runs from the source tree (no install needed): PYTHONPATH=src and the first python3 that has torch
# (override with PY=...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=gpu-check-$(date +%Y%m%d-%H%M%S)
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT_DIR=$1; shift; fi
if [ -z "${PY:-}" ]; then  # a python whose torch sees a GPU, else the first with torch at all
  for c in .venv/bin/python python3 .venv/bin/python python3; do
    want='import torch; assert torch.cuda.is_available()'; [ -n "${tried:-}" ] && want='import torch'
    if command -v "$c" >/dev/null && "$c" -c "$want" 2>/dev/null; then PY=$c; break; fi
    [ "$c" = python3 ] && tried=1
  done
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
          f"{torch.cuda.device_count()} GPU(s)")'
timeout 480 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
echo "report: $OUT_DIR/report.md"
