#!/usr/bin/env bash
# The ReT stage, step by step (needs the world's m2kr/ files and the dense stage's checkpoint-best).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
for step in 01_cache 02_train 03_index 04_search 05_evaluate; do
  t=$(date +%s); bash "scripts/ret/$step.sh"; stage_time "ret/$step" "$t"
done
