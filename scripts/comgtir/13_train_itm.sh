#!/usr/bin/env bash
# The Shapes ITM cross-encoder (stands in for BLIP's ITM head, which needs pretrained weights); nothing to train on
# real data, where the re-ranking uses BLIP ITM as released.
# Multi-process: NPROC=2 bash scripts/comgtir/13_train_itm.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

if ! is_shapes; then
  echo "train_itm: $DATASET re-ranks with a pretrained BLIP ITM (rerank.yaml); nothing to train"
  exit 0
fi
EPOCHS=$(fast_or 1 1)
QUERIES_PER_EPOCH=$(fast_or 500 3000)

launch retriever.generative.train_itm --dense_checkpoint "$ENCODER" \
  --emb_dir "$EMB_DIR" --data_json "$DATA_JSON" --image_root "$IMAGE_ROOT" \
  --output_dir "$COMGTIR_DIR/itm" --epochs "$EPOCHS" --queries_per_epoch "$QUERIES_PER_EPOCH" --seed "$SEED" "$@"
