#!/usr/bin/env bash
# Stage 2: from stage 1, the encoder + set head learn the order-invariant identifier.
# Multi-process: NPROC=2 bash scripts/comgtir/07_stage2_setid.sh (torchrun, DDP; the batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

HP=()  # real data: the dataset's retriever.yaml
if is_shapes; then HP=(--epochs "$(fast_or 1 1)" --batch_size 256 --lr 2e-3); fi

launch retriever.generative.train --config "$COMGTIR_CONFIGS/retriever.yaml" --stage setid \
  --init "$COMGTIR_DIR/stage1_seqid/checkpoint-best" \
  --data_dir "$COMGTIR_DIR/data" --codes "$COMGTIR_DIR/codes.json" \
  --output_dir "$COMGTIR_DIR/stage2_setid" "${HP[@]}" \
  --seed "$SEED" "$@"
