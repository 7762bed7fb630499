#!/usr/bin/env bash
# The MIR stage (GenIR), step by step. Needs the dense stage (and, for USER_KIND=mtst, the CIR stage's MTST generator).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
for step in 01_train_generator 02_genir 03_prediction 04_text_only 05_image_query 06_report; do
  t=$(date +%s); bash "scripts/mir/$step.sh"; stage_time "mir/$step" "$t"
done
