#!/usr/bin/env bash
# Hybrid retrieval: re-rank the dual-id top-k with the dual encoder of prepare_emb → row dual-id+dense-rerank.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

HP=()  # real data: the dataset's rerank.yaml
if is_shapes; then HP=(--depth 20); fi

"$PYTHON" -m retriever.generative.rerank --config "$COMGTIR_CONFIGS/rerank.yaml" --method dense \
  --candidates "$COMGTIR_DIR/eval/dual-id/candidates.jsonl" --emb_dir "$EMB_DIR" \
  --dense_checkpoint "$ENCODER" "${HP[@]}" \
  --output_dir "$COMGTIR_DIR/eval/dual-id+dense-rerank" \
  --summary "$RUN_DIR/results.json" --summary_row "comgtir/dual-id+dense-rerank$ROW_SUFFIX" "$@"
