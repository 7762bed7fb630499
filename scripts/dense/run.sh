#!/usr/bin/env bash
# The dense stage, step by step.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
for step in 01_train 02_encode 03_evaluate; do
  t=$(date +%s); bash "scripts/dense/$step.sh"; stage_time "dense/$step" "$t"
done
