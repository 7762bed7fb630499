#!/usr/bin/env bash
# Stage 3: train ComGTIR-D, both identifiers jointly, from the stage-2 model (best by validation recall).
# (No merge step: stage 2 leaves stage 1's decoder, embeddings and LM head as they were, so its checkpoint already
# is the original's "unified encoder" model, stage-1 decoder + stage-2 encoder and set head.)
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
  --init "$COMGTIR_DIR/stage2_setid/checkpoint-best" \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage3_unified" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --set_weight "$SET_WEIGHT" --guidance "$GUIDANCE" --seed "$SEED" "$@"
