#!/usr/bin/env bash
# Train the dense dual encoder (CLIP-style) on the Shapes world. Resumes from checkpoint-last if present.
# Multi-process: NPROC=2 bash scripts/dense/01_train.sh (torchrun, DDP); several nodes: NNODES, RDZV_ENDPOINT (README).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

EPOCHS=$(fast_or 6 8)
BATCH_SIZE=$(fast_or 64 128)
LR=1e-3

launch retriever.dense.train --config configs/dense/shapes.yaml \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --output_dir "$RUN_DIR/dense" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
