#!/usr/bin/env bash
# The Shapes ITM cross-encoder (stands in for BLIP's ITM head, which needs pretrained weights).
# Multi-process: NPROC=2 bash scripts/comgtir/13_train_itm.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 1 1)
QUERIES_PER_EPOCH=$(fast_or 500 3000)

launch retriever.generative.train_itm --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" \
  --emb_dir "$RUN_DIR/dense/emb" --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --output_dir "$COMGTIR_DIR/itm" --epochs "$EPOCHS" --queries_per_epoch "$QUERIES_PER_EPOCH" --seed "$SEED" "$@"
