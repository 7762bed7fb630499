#!/usr/bin/env bash
# Stage 4: Recall@1/5/10 on the test split (the dense stage's queries and gallery): stage 1 alone (row seq-id)
# and ComGTIR-D with set-guided decoding (row dual-id). Writes the candidate lists the re-rankers read.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

NUM_BEAMS=20

"$PYTHON" -m retriever.generative.evaluate --config configs/comgtir/shapes/evaluate.yaml \
  --checkpoint "$COMGTIR_DIR/stage1_seqid/checkpoint-best" --guidance 0 \
  --codes "$COMGTIR_DIR/codes.json" --emb_dir "$RUN_DIR/dense/emb" --num_beams "$NUM_BEAMS" \
  --output_dir "$COMGTIR_DIR/eval/seq-id" --summary "$RUN_DIR/results.json" --summary_row "comgtir/seq-id$ROW_SUFFIX" "$@"
