#!/usr/bin/env bash
# Stage 3a: merge the stage-1 model (decoder, embeddings) with the stage-2 encoder and set head.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

ENCODER_MIX=1.0

"$PYTHON" -m retriever.generative.merge --stage1 "$COMGTIR_DIR/stage1_seqid/checkpoint-best" \
  --stage2 "$COMGTIR_DIR/stage2_setid/checkpoint-best" --output "$COMGTIR_DIR/stage3_merged" \
  --encoder_mix "$ENCODER_MIX" "$@"
