#!/usr/bin/env bash
# Stage 3a: merge the stage-1 model (decoder, embeddings) with the stage-2 encoder and set head.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

ENCODER_MIX=1.0

"$PYTHON" -m retriever.generative.merge --stage1 "$RUN_DIR/comgtir/stage1_seqid/checkpoint-best" \
  --stage2 "$RUN_DIR/comgtir/stage2_setid/checkpoint-best" --output "$RUN_DIR/comgtir/stage3_merged" \
  --encoder_mix "$ENCODER_MIX" --seed "$SEED" "$@"
