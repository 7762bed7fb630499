#!/usr/bin/env bash
# Stage 2: from stage 1, the encoder + set head learn the order-invariant identifier.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 1 1)
BATCH_SIZE=256
LR=2e-3

"$PYTHON" -m retriever.generative.train --config configs/comgtir/shapes/retriever.yaml --stage setid \
  --init "$COMGTIR_DIR/stage1_seqid/checkpoint-best" \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage2_setid" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
