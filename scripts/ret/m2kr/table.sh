#!/usr/bin/env bash
# The whole ReT-M2KR table: every test set in turn (a set already measured is skipped unless REDO=1), then the
# table. Any --key value is passed to every evaluation (e.g. --checkpoint, --num_workers).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/common.sh

SETS=(wit iglue kvqa oven llava infoseek evqa okvqa)
EVAL_DIR="${EVAL_DIR:-runs/m2kr/eval}"
REDO="${REDO:-0}"

for set in "${SETS[@]}"; do
  if [ "$REDO" = "1" ] || [ ! -f "$EVAL_DIR/$set/metrics.json" ]; then
    "$PYTHON" -m retriever.ret.evaluate --config "configs/ret/m2kr_test/$set.yaml" --output_dir "$EVAL_DIR/$set" "$@"
  fi
done
"$PYTHON" -m retriever.ret.m2kr_table --eval_dir "$EVAL_DIR"
