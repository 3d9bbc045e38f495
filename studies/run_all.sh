#!/usr/bin/env bash
# Regenerates every study of docs/RESULTS.md, then the document itself. Finished runs are skipped and
# interrupted ones resumed, so this can be stopped and started again at any point.
#   make evidence        (or: studies/run_all.sh from the repository root, with peerdistill installed)
# docs/RESULTS.md states each step's wall time, read from the steps' own records (study.json, tstddev.json, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PD=${PEERDISTILL:-peerdistill}
mkdir -p runs
step() {  # step NAME COMMAND...: run it, say how long it took
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "=== $(date '+%H:%M:%S') $name: $*"
  "$@"
  echo "=== $name: $(( $(date +%s) - t0 )) s"
}
step mixed_samples "$PD" sweep studies/mixed_samples.yaml
step good_da_teacher "$PD" sweep studies/good_da_teacher.yaml
[ -f runs/good_da/tstddev.json ] || step tstddev "$PD" tstddev runs/good_da_teacher/teacher_s0 --out runs/good_da/tstddev.json --no-progress
[ -f runs/good_da/tstddev_stability.json ] || step tstddev_stability python studies/tstddev_stability.py \
  runs/good_da_teacher/teacher_s0 runs/good_da/tstddev.json
step good_da "$PD" sweep studies/good_da.yaml
step correlate "$PD" correlate runs/good_da/tstddev.json runs/good_da/extra_aug-*_s*
step self_kd "$PD" sweep studies/self_kd.yaml
step calibration python studies/calibration.py runs/self_kd   # every row of the study
step online_kd "$PD" sweep studies/online_kd.yaml
step budget "$PD" sweep studies/budget.yaml
step results python studies/results.py
