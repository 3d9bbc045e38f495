#!/usr/bin/env bash
# Regenerates every study of docs/RESULTS.md, then the document itself. Finished runs are skipped and
# interrupted ones resumed, so this can be stopped and started again at any point.
#   make evidence        (or: studies/run_all.sh from the repository root, with peerdistill installed)
# Wall time of each step is appended to runs/evidence_times.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PD=${PEERDISTILL:-peerdistill}
mkdir -p runs
step() {  # step NAME COMMAND...: run, time, record
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "=== $(date '+%H:%M:%S') $name: $*"
  "$@"
  printf '{"step": "%s", "seconds": %s, "finished": "%s"}\n' "$name" "$(( $(date +%s) - t0 ))" \
    "$(date -Iseconds)" >> runs/evidence_times.jsonl
}
step mixed_samples "$PD" sweep studies/mixed_samples.yaml
step good_da_teacher "$PD" sweep studies/good_da_teacher.yaml
[ -f runs/good_da/tstddev.json ] || step tstddev "$PD" tstddev runs/good_da_teacher/teacher_s0 --out runs/good_da/tstddev.json --no-progress
[ -f runs/good_da/tstddev_stability.json ] || step tstddev_stability python studies/tstddev_stability.py \
  runs/good_da_teacher/teacher_s0 runs/good_da/tstddev.json
step good_da "$PD" sweep studies/good_da.yaml
step correlate "$PD" correlate runs/good_da/tstddev.json runs/good_da/extra_aug-*_s*
step self_kd "$PD" sweep studies/self_kd.yaml
step online_kd "$PD" sweep studies/online_kd.yaml
step results python studies/results.py
