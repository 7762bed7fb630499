#!/usr/bin/env bash
# Hybrid retrieval: re-rank the dual-id top-k with the dense (CLIP-style) model → row dual-id+dense-rerank.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

DEPTH=20

"$PYTHON" -m retriever.generative.rerank --config configs/comgtir/shapes/rerank.yaml --method dense \
  --candidates "$COMGTIR_DIR/eval/dual-id/candidates.jsonl" --emb_dir "$RUN_DIR/dense/emb" \
  --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" --depth "$DEPTH" \
  --output_dir "$COMGTIR_DIR/eval/dual-id+dense-rerank" \
  --summary "$RUN_DIR/results.json" --summary_row "comgtir/dual-id+dense-rerank$ROW_SUFFIX" "$@"
