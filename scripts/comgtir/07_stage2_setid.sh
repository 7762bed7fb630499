#!/usr/bin/env bash
# Stage 2: from stage 1, the encoder + set head learn the order-invariant identifier.
# Multi-process: NPROC=2 bash scripts/comgtir/07_stage2_setid.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 1 1)
BATCH_SIZE=256
LR=2e-3

launch retriever.generative.train --config configs/comgtir/shapes/retriever.yaml --stage setid \
  --init "$COMGTIR_DIR/stage1_seqid/checkpoint-best" \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage2_setid" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
