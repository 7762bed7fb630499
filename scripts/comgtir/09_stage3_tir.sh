#!/usr/bin/env bash
# Stage 3: train ComGTIR-D, both identifiers jointly, from the stage-2 model (best by validation recall).
# (No merge step: stage 2 leaves stage 1's decoder, embeddings and LM head as they were, so its checkpoint already
# is the original's "unified encoder" model, stage-1 decoder + stage-2 encoder and set head.)
# Multi-process: NPROC=2 bash scripts/comgtir/09_stage3_tir.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

HP=()  # real data: the dataset's retriever.yaml (set_weight, guidance among them)
if is_shapes; then
  # guidance 4.0: chosen on the validation split of a 600-image dev world (1, 2, 4: 4 best; larger untested)
  HP=(--epochs "$(fast_or 1 1)" --batch_size 256 --lr 1e-3 --set_weight 1.0 --guidance 4.0)
fi

launch retriever.generative.train --config "$COMGTIR_CONFIGS/retriever.yaml" --stage unified \
  --init "$COMGTIR_DIR/stage2_setid/checkpoint-best" \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage3_unified" "${HP[@]}" --seed "$SEED" "$@"
