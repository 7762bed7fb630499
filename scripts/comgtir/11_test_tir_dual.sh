#!/usr/bin/env bash
# Stage 4: ComGTIR-D (unified model, beam search guided by the set identifier) → row dual-id, and the candidate
# lists the re-rankers read.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

GUIDANCE=()  # real data: the dataset's evaluate.yaml
if is_shapes; then
  # guidance 4.0: chosen on the validation split of a 600-image dev world (1, 2, 4: 4 best; larger untested)
  GUIDANCE=(--guidance 4.0)
fi
BEAMS=()
if is_shapes; then BEAMS=(--num_beams 20); fi

"$PYTHON" -m retriever.generative.evaluate --config "$COMGTIR_CONFIGS/evaluate.yaml" \
  --checkpoint "$COMGTIR_DIR/stage3_unified/checkpoint-best" "${GUIDANCE[@]}" \
  --codes "$COMGTIR_DIR/codes.json" --emb_dir "$EMB_DIR" "${BEAMS[@]}" \
  --output_dir "$COMGTIR_DIR/eval/dual-id" --summary "$RUN_DIR/results.json" --summary_row "comgtir/dual-id$ROW_SUFFIX" "$@"
