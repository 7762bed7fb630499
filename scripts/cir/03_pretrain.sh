#!/usr/bin/env bash
# Pretrain the composed retriever on the synthetic triplets (L_q2t). Its best checkpoint is also the zero-shot row.
# -> $RUN_DIR/cir/pretrain-synthetic/
# Multi-process: NPROC=2 bash scripts/cir/03_pretrain.sh (torchrun, DDP; the global batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

EPOCHS=$(fast_or 2 3)
BATCH_SIZE=128
LR=1e-3

launch cir.train --config configs/cir/shapes_train.yaml \
  --cirr_root "$DATA_DIR/cirr" --train_root "$RUN_DIR/cir/synthetic" --image_root "$DATA_DIR/cirr/img_raw" \
  --data_json "$DATA_DIR/dataset_shapes.json" --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" \
  --output_dir "$RUN_DIR/cir/pretrain-synthetic" --objective q2t \
  --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" --seed "$SEED" "$@"
