#!/usr/bin/env bash
# The main job: every stage on the Shapes world, then the summary table ($RUN_DIR/results.json and results.md).
# Environment: RUN_DIR (default runs/shapes), SEED (default 0), FAST=1 for a tiny world (minutes, for checking).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
mkdir -p "$RUN_DIR"
START=$(date +%s)

t=$(date +%s); bash scripts/01_make_shapes.sh; stage_time world "$t"
t=$(date +%s); bash scripts/dense/run.sh; stage_time dense "$t"
t=$(date +%s); bash scripts/comgtir/run.sh; stage_time comgtir "$t"
t=$(date +%s); bash scripts/ret/run.sh; stage_time ret "$t"
t=$(date +%s); bash scripts/cir/run.sh; stage_time cir "$t"
t=$(date +%s); bash scripts/cir/iterative/run.sh; stage_time cir-iterative "$t"
t=$(date +%s); bash scripts/mir/run.sh; stage_time mir "$t"

echo
cat "$RUN_DIR/results.md"
echo "main job finished in $(( $(date +%s) - START ))s; summary in $RUN_DIR/results.json"
