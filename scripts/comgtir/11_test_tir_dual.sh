#!/usr/bin/env bash
# Stage 4: ComGTIR-D (unified model, beam search guided by the set identifier) → row dual-id.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

NUM_BEAMS=20
GUIDANCE=4.0  # chosen on the validation split of a 600-image dev world (1, 2, 4: 4 best; larger untested)

"$PYTHON" -m retriever.generative.evaluate --config configs/comgtir/shapes/evaluate.yaml \
  --checkpoint "$COMGTIR_DIR/stage3_unified/checkpoint-best" --guidance "$GUIDANCE" \
  --codes "$COMGTIR_DIR/codes.json" --emb_dir "$RUN_DIR/dense/emb" --num_beams "$NUM_BEAMS" \
  --output_dir "$COMGTIR_DIR/eval/dual-id" --summary "$RUN_DIR/results.json" --summary_row "comgtir/dual-id$ROW_SUFFIX" "$@"
