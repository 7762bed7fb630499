#!/usr/bin/env bash
# Stage 2: from stage 1, the encoder + set head learn the order-invariant identifier.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

EPOCHS=$(fast_or 1 1)
BATCH_SIZE=256
LR=2e-3

"$PYTHON" -m retriever.generative.train --config configs/comgtir/shapes/retriever.yaml --stage setid \
  --init "$RUN_DIR/comgtir/stage1_seqid/checkpoint-best" \
  --data_dir "$RUN_DIR/comgtir/data" --codes "$RUN_DIR/comgtir/codes.json" \
  --output_dir "$RUN_DIR/comgtir/stage2_setid" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
