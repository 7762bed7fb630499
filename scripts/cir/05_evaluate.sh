#!/usr/bin/env bash
# CIRR metrics of every row on the Shapes test split (+ CIRR test-server files of pretrain+ptha) -> results.json "cir".
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

C="$RUN_DIR/cir"
ROWS="{\"no-pretrain\": \"$C/no-pretrain/checkpoint-best\", \"pretrain\": \"$C/pretrain/checkpoint-best\",
 \"pretrain+ptha\": \"$C/pretrain+ptha/checkpoint-best\", \"ptha-alpha0\": \"$C/ptha-alpha0/checkpoint-best\",
 \"ptha-alpha1\": \"$C/ptha-alpha1/checkpoint-best\", \"zero-shot\": \"$C/pretrain-synthetic/checkpoint-best\"}"

"$PYTHON" -m cir.evaluate --cirr_root "$DATA_DIR/cirr" --split test --rows "$ROWS" \
  --output_dir "$C/eval" --mtst_metrics "$C/mtst/metrics.json" --summary "$RUN_DIR/results.json" "$@"
