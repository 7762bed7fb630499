#!/usr/bin/env bash
# Stage 1: the T5 learns to generate the sequential identifier (best checkpoint by validation recall).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 1 2)
BATCH_SIZE=256
LR=3e-3

"$PYTHON" -m retriever.generative.train --config configs/comgtir/shapes/retriever.yaml --stage seqid \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage1_seqid" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
