#!/usr/bin/env bash
# Stage 1: the T5 learns to generate the sequential identifier (best checkpoint by validation recall).
# Multi-process: NPROC=2 bash scripts/comgtir/06_stage1_seqid.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 1 2)
BATCH_SIZE=256
LR=3e-3

launch retriever.generative.train --config configs/comgtir/shapes/retriever.yaml --stage seqid \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" --rqvae "$COMGTIR_DIR/rqvae" \
  --output_dir "$COMGTIR_DIR/stage1_seqid" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
