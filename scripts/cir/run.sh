#!/usr/bin/env bash
# The composed-retrieval stage (MTST + PTHA), step by step; needs the world and the dense stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
for step in 01_train_mtst 02_synthesize 03_pretrain 04_finetune 05_evaluate; do
  t=$(date +%s); bash "scripts/cir/$step.sh"; stage_time "cir/$step" "$t"
done
