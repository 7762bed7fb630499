#!/usr/bin/env bash
# Train the RQ-VAE tokenizer on the dense image embeddings (selected on validation reconstruction).
# Multi-process: NPROC=2 bash scripts/comgtir/02_train_rqvae.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 20 100)
BATCH_SIZE=$(fast_or 128 512)

launch rqvae.train --config configs/comgtir/shapes/rqvae.yaml \
  --emb_dir "$RUN_DIR/dense/emb" --output_dir "$COMGTIR_DIR/rqvae" \
  --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --seed "$SEED" "$@"
