#!/usr/bin/env bash
# The iterative CIR stage in the main job, step by step, once with each Shapes foundation stand-in (the scene reader,
# then the MTST generator); needs the CIR stage (scripts/cir/run.sh) first.
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/common.sh
# FAST=1 (a check that every step runs) trains with the scene-reader stand-in only
for foundation in $(fast_or "scene_reader" "scene_reader mtst"); do
  for step in 01_train 02_evaluate; do
    t=$(date +%s); FOUNDATION=$foundation bash "scripts/cir/iterative/$step.sh"; stage_time "cir-iterative/$step ($foundation)" "$t"
  done
done
