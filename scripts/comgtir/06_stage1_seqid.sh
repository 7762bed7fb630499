#!/usr/bin/env bash
# Stage 1: the T5 learns to generate the sequential identifier (best checkpoint by validation recall).
# Multi-process: NPROC=2 bash scripts/comgtir/06_stage1_seqid.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

HP=()  # real data: the dataset's retriever.yaml (its T5, or COMGTIR_T5)
if is_shapes; then
  HP=(--epochs "$(fast_or 1 2)" --batch_size 256 --lr 3e-3)
elif [ -n "${COMGTIR_T5:-}" ]; then
  HP=(--tokenizer "$COMGTIR_T5" --model "{pretrained: '$COMGTIR_T5'}")
fi

launch retriever.generative.train --config "$COMGTIR_CONFIGS/retriever.yaml" --stage seqid \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" --rqvae "$COMGTIR_DIR/rqvae" \
  --output_dir "$COMGTIR_DIR/stage1_seqid" "${HP[@]}" \
  --seed "$SEED" "$@"
