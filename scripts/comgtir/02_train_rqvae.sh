#!/usr/bin/env bash
# Train the RQ-VAE tokenizer on the image embeddings of prepare_emb (selected on validation reconstruction).
# Multi-process: NPROC=2 bash scripts/comgtir/02_train_rqvae.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

HP=()  # real data: epochs and batch size from the dataset's rqvae.yaml
if is_shapes; then HP=(--epochs "$(fast_or 20 100)" --batch_size "$(fast_or 128 512)"); fi

launch rqvae.train --config "$COMGTIR_CONFIGS/rqvae.yaml" \
  --emb_dir "$EMB_DIR" --output_dir "$COMGTIR_DIR/rqvae" \
  "${HP[@]}" --seed "$SEED" "$@"
