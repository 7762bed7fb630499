#!/usr/bin/env bash
# Train the dense dual encoder (CLIP-style) on the Shapes world. Resumes from checkpoint-last if present.
# Multi-process: NPROC=2 bash scripts/dense/01_train.sh (torchrun, DDP); several nodes: NNODES, RDZV_ENDPOINT (README).
# DENSE_CONFIG picks the tower: configs/dense/shapes.yaml (ResNet with hard negatives, the default) or
# configs/dense/shapes_vit.yaml (the ViT, which does not learn where objects are: docs/dense.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

EPOCHS=$(fast_or 3 8)
BATCH_SIZE=$(fast_or 64 128)
LR=1e-3
# FAST=1 checks the plumbing: plain CLIP training, without the twins and contrasts that triple an image batch.
HARD_NEGATIVES=$(fast_or "--twin_edits [] --contrast_kinds []" "")

# shellcheck disable=SC2086  # HARD_NEGATIVES is a list of flags
launch retriever.dense.train --config "${DENSE_CONFIG:-configs/dense/shapes.yaml}" \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --output_dir "$RUN_DIR/dense" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" $HARD_NEGATIVES "$@"
