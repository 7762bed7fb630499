#!/usr/bin/env bash
# Stage 3b: train ComGTIR-D, both identifiers jointly, from the merged model (best by validation recall).
# Multi-process: NPROC=2 bash scripts/comgtir/09_stage3_tir.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EPOCHS=$(fast_or 1 1)
BATCH_SIZE=256
LR=1e-3
SET_WEIGHT=1.0
GUIDANCE=4.0  # chosen on the validation split of a 600-image dev world (1, 2, 4: 4 best; larger untested)

launch retriever.generative.train --config configs/comgtir/shapes/retriever.yaml --stage unified \
  --init "$COMGTIR_DIR/stage3_merged" \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage3_unified" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --set_weight "$SET_WEIGHT" --guidance "$GUIDANCE" --seed "$SEED" "$@"
